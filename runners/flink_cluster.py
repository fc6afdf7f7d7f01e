"""A standalone Flink session cluster on 127.0.0.1, from the classes inside the job-server jar.

    headrace stack up --flink [--taskmanagers 2] [--slots 2]   a JobManager and TaskManagers
    headrace stack status                                      where each listens, pids, logs
    headrace stack down                                        stop everything `stack up` started

The Flink job-server jar `make jars` builds carries Flink's runtime, so a real cluster needs no Flink
download: the JobManager is ``StandaloneSessionClusterEntrypoint`` and each TaskManager a
``TaskManagerRunner`` JVM, all configured by one ``flink-conf.yaml`` written here. Flink's shell scripts
(which compute a TaskManager's memory split and pass it as dynamic properties) are not in the jar, so every
TaskManager memory setting is written explicitly (`_CONF`), and the JVM's heap and direct-memory limits
match them.

Pipelines run on it as on any remote Flink: a Beam job server submits to the JobManager's REST port
(``--flink_master=127.0.0.1:PORT``), and the Python stages run in SDK workers that each TaskManager starts
as its own child processes (``--environment_type=PROCESS``, the command `headrace.runners.sdk_worker`),
not in the submitting process (LOOPBACK). `FlinkCluster.beam_args` are those flags.

Why not EXTERNAL against one Beam worker pool: every TaskManager numbers its SDK workers from ``1-1``
and a worker pool's StopWorker request carries only that id, so a pool shared by two TaskManagers
stopped one TaskManager's worker when the other released its own; the first then waited for a worker
that never came, and crowd-labels hung (measured: 216 of 1,136 tasks done, then nothing for 10
minutes). EXTERNAL needs one pool per TaskManager, as a sidecar in the same pod, on Kubernetes.

Checkpoints go to a file system state backend under the cluster's work directory; a restart strategy of
fixed delay lets a job survive a TaskManager that dies (`add_taskmanager` starts a replacement, as a
Kubernetes Deployment would). The TaskManagers have the job-server jar on their class path and the job
server submits the same jar as the job's: Flink's default child-first class loading then split Beam's
vendored gRPC between two class loaders (IllegalAccessError in netty, the job hung with its SDK workers
disconnected), so classes resolve parent-first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from headrace.runners import jars, sdk_worker
from headrace.runners.stack import StackError, _alive, _listening, _tail, free_port

__all__ = ["FlinkCluster", "add_taskmanager", "flink_cluster", "overview", "start_cluster", "stop_cluster"]

_log = logging.getLogger(__name__)

# Every TaskManager memory component given (what Flink's taskmanager.sh would compute and pass): the
# TaskManagerRunner refuses to start without them. A TaskManager process is about 1.2 GiB. Each blocking
# result partition of a batch job takes sort-shuffle.min-buffers (512 by default): crowd-labels' unrolled EM
# iterations have dozens, which 32,768 buffers did not hold (measured); 64 each fit in 16,384.
_CONF = """\
jobmanager.rpc.address: 127.0.0.1
jobmanager.rpc.port: {rpc_port}
jobmanager.bind-host: 127.0.0.1
jobmanager.memory.process.size: 800m
rest.address: 127.0.0.1
rest.bind-address: 127.0.0.1
rest.port: {rest_port}
taskmanager.host: 127.0.0.1
taskmanager.bind-host: 127.0.0.1
taskmanager.numberOfTaskSlots: {slots}
taskmanager.cpu.cores: {slots}
taskmanager.memory.framework.heap.size: 128m
taskmanager.memory.task.heap.size: 384m
taskmanager.memory.framework.off-heap.size: 128m
taskmanager.memory.task.off-heap.size: 64m
taskmanager.memory.network.min: 256m
taskmanager.memory.network.max: 256m
taskmanager.memory.segment-size: 16kb
taskmanager.network.memory.buffers-per-channel: 2
taskmanager.network.sort-shuffle.min-buffers: 64
taskmanager.memory.managed.size: 128m
taskmanager.memory.jvm-metaspace.size: 256m
taskmanager.memory.jvm-overhead.min: 192m
taskmanager.memory.jvm-overhead.max: 192m
parallelism.default: {parallelism}
state.backend.type: hashmap
state.checkpoints.dir: file://{work}/checkpoints
execution.checkpointing.externalized-checkpoint-retention: RETAIN_ON_CANCELLATION
restart-strategy.type: fixed-delay
restart-strategy.fixed-delay.attempts: 20
restart-strategy.fixed-delay.delay: 2 s
heartbeat.interval: 5000
heartbeat.timeout: 30000
slot.request.timeout: 60000
io.tmp.dirs: {work}/tmp
classloader.resolve-order: parent-first
"""
# -Xmx = framework + task heap; direct = framework + task off-heap + network (what taskmanager.sh passes).
_BOOT = "sdk-worker"  # in the cluster's work directory: the PROCESS environment's command
# The jar logs through slf4j-simple, without times unless asked.
_LOG_TIMES = [
    "-Dorg.slf4j.simpleLogger.showDateTime=true",
    "-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS",
]
_TM_JVM = ["-Xmx512m", "-Xms512m", "-XX:MaxDirectMemorySize=448m", "-XX:MaxMetaspaceSize=256m", *_LOG_TIMES]
_JM_JVM = ["-Xmx512m", "-XX:MaxMetaspaceSize=256m", *_LOG_TIMES]


@dataclasses.dataclass(frozen=True)
class FlinkCluster:
    """Where a started cluster listens and which processes it is."""

    rest_port: int
    rpc_port: int
    taskmanagers: int
    slots: int
    workdir: str
    pids: dict[str, int]

    @property
    def master(self) -> str:
        """The JobManager's REST address, for ``--flink_master``."""
        return f"127.0.0.1:{self.rest_port}"

    def beam_args(self, parallelism: int | None = None) -> list[str]:
        """The Beam flags of a pipeline run on this cluster (with `parallelism`, default every slot): its
        Python stages in SDK workers each TaskManager starts as child processes."""
        boot = json.dumps({"command": str(Path(self.workdir) / _BOOT)})
        return [
            f"--flink_master={self.master}",
            "--environment_type=PROCESS",
            f"--environment_config={boot}",
            f"--parallelism={parallelism or self.taskmanagers * self.slots}",
        ]

    def log(self, name: str) -> Path:
        return Path(self.workdir) / f"{name}.log"


def _java() -> str:
    return shutil.which("java") or "java"


def _spawn(name: str, command: list[str], work: Path) -> subprocess.Popen:
    with open(work / f"{name}.log", "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def overview(cluster: FlinkCluster, timeout: float = 5.0) -> dict:
    """The JobManager's REST ``/overview`` (taskmanagers, slots-total, jobs-running ...)."""
    with urllib.request.urlopen(f"http://{cluster.master}/overview", timeout=timeout) as r:
        return json.loads(r.read())


def _write_boot(work: Path) -> None:
    """The command each TaskManager starts an SDK worker with (PROCESS): `sdk_worker` under this
    interpreter, the one with headrace and the pipeline's packages."""
    boot = work / _BOOT
    boot.write_text(
        "#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in sdk_worker.command_line()) + ' "$@"\n'
    )
    boot.chmod(0o755)


def _taskmanager_command(jar: str, conf: Path) -> list[str]:
    return [_java(), *_TM_JVM, "-cp", jar, "org.apache.flink.runtime.taskexecutor.TaskManagerRunner",
            "--configDir", str(conf)]  # fmt: skip


def start_cluster(
    *, taskmanagers: int = 2, slots: int = 2, workdir: str | os.PathLike | None = None, timeout: float = 150.0
) -> FlinkCluster:
    """Starts a JobManager and `taskmanagers` TaskManagers of `slots` slots; returns once every TaskManager
    has registered. Raises StackError with the end of a log when one does not."""
    jar = str(jars.jar_path("flink-job-server"))
    rest, rpc = free_port(), free_port()
    work = Path(workdir) if workdir else jars.cache_dir() / "stack" / f"flink-{rest}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "conf").mkdir(parents=True)
    (work / "tmp").mkdir()
    (work / "conf" / "flink-conf.yaml").write_text(
        _CONF.format(rest_port=rest, rpc_port=rpc, slots=slots, parallelism=taskmanagers * slots, work=work)
    )
    conf = work / "conf"
    procs: dict[str, subprocess.Popen] = {}
    entry = "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint"
    procs["jobmanager"] = _spawn(
        "jobmanager", [_java(), *_JM_JVM, "-cp", jar, entry, "--configDir", str(conf)], work
    )
    for i in range(taskmanagers):
        procs[f"taskmanager-{i}"] = _spawn(f"taskmanager-{i}", _taskmanager_command(jar, conf), work)
    _write_boot(work)
    pids = {name: p.pid for name, p in procs.items()}
    cluster = FlinkCluster(rest, rpc, taskmanagers, slots, str(work), pids)
    deadline = time.monotonic() + timeout
    try:
        while True:
            for name, p in procs.items():
                if p.poll() is not None:
                    raise StackError(f"flink: {name} exited with {p.returncode}:\n{_tail(cluster.log(name))}")
            registered = 0
            if _listening(rest):
                with contextlib.suppress(OSError, ValueError):
                    registered = overview(cluster)["taskmanagers"]
            if registered >= taskmanagers:
                break
            if time.monotonic() > deadline:
                raise StackError(
                    f"flink: {registered} of {taskmanagers} TaskManagers registered after {timeout:.0f}s:\n"
                    + _tail(cluster.log("taskmanager-0"))
                )
            time.sleep(0.5)
    except BaseException:
        stop_cluster(cluster)
        raise
    (work / "cluster.json").write_text(json.dumps(dataclasses.asdict(cluster)))
    _log.info(
        "flink cluster: JobManager %s, %d TaskManagers x %d slots (logs in %s)",
        cluster.master, taskmanagers, slots, work,
    )  # fmt: skip
    return cluster


def add_taskmanager(cluster: FlinkCluster, timeout: float = 120.0) -> str:
    """Starts one more TaskManager (a replacement for one that died) and returns once the JobManager
    counts it; its name (``taskmanager-N``) is added to `cluster.pids`."""
    jar = str(jars.jar_path("flink-job-server"))
    work = Path(cluster.workdir)
    before = overview(cluster)["taskmanagers"]
    name = f"taskmanager-{len([n for n in cluster.pids if n.startswith('taskmanager-')])}"
    proc = _spawn(name, _taskmanager_command(jar, work / "conf"), work)
    cluster.pids[name] = proc.pid
    deadline = time.monotonic() + timeout
    while overview(cluster)["taskmanagers"] <= before:
        if proc.poll() is not None:
            raise StackError(f"flink: {name} exited with {proc.returncode}:\n{_tail(cluster.log(name))}")
        if time.monotonic() > deadline:
            raise StackError(f"flink: {name} did not register in {timeout:.0f}s:\n{_tail(cluster.log(name))}")
        time.sleep(0.5)
    return name


def _terminate(pid: int, timeout: float) -> None:
    if not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return
        if not _alive(pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def stop_cluster(cluster: FlinkCluster, timeout: float = 20.0) -> None:
    """Stops the TaskManagers (each with the SDK workers it started, in its process group), then the
    JobManager."""
    order = sorted(cluster.pids, key=lambda n: (n == "jobmanager", n))
    for name in order:
        _terminate(cluster.pids[name], timeout)


@contextlib.contextmanager
def flink_cluster(taskmanagers: int = 2, slots: int = 2, workdir=None) -> Iterator[FlinkCluster]:
    """A cluster for the block's duration, stopped (every process) when it ends."""
    cluster = start_cluster(taskmanagers=taskmanagers, slots=slots, workdir=workdir)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


# -- `headrace stack up --flink` --------------------------------------------------------------------


def _state_file() -> Path:
    return jars.cache_dir() / "stack" / "flink.json"


def status() -> FlinkCluster | None:
    """The cluster `stack up --flink` started, if its JobManager still runs."""
    path = _state_file()
    if not path.is_file():
        return None
    cluster = FlinkCluster(**json.loads(path.read_text()))
    return cluster if _alive(cluster.pids["jobmanager"]) else None


def up(taskmanagers: int = 2, slots: int = 2) -> FlinkCluster:
    running = status()
    if running is not None:
        return running
    cluster = start_cluster(taskmanagers=taskmanagers, slots=slots)
    _state_file().parent.mkdir(parents=True, exist_ok=True)
    _state_file().write_text(json.dumps(dataclasses.asdict(cluster)))
    return cluster


def down() -> bool:
    path = _state_file()
    if not path.is_file():
        return False
    cluster = FlinkCluster(**json.loads(path.read_text()))
    stop_cluster(cluster)
    path.unlink(missing_ok=True)
    return True


def describe(cluster: FlinkCluster) -> str:
    alive = {name: _alive(pid) for name, pid in cluster.pids.items()}
    parts = ", ".join(f"{name} {pid}{'' if alive[name] else ' (dead)'}" for name, pid in cluster.pids.items())
    return (
        f"flink: JobManager {cluster.master}, {cluster.taskmanagers} TaskManagers x {cluster.slots} slots, "
        f"pids: {parts}; logs in {cluster.workdir}\n"
        f"  run on it with: --runner flink {' '.join(shlex.quote(a) for a in cluster.beam_args())}"
    )
