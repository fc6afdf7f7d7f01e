"""The local JVM services: a Kafka broker on loopback, the KafkaIO expansion service, Flink's job server.

    headrace stack up [--kafka-port 9092]     start a broker (KRaft mode, no ZooKeeper) in the cache folder
    headrace stack status                     where it listens, its pid, its log
    headrace stack down                       stop it

Both come from jars `make jars` builds from Maven Central (`headrace.runners.jars`): the broker is Kafka
3.9 (tfio's bundled librdkafka speaks its protocol versions; Kafka 4 dropped older ones), the expansion
service is the Flink job-server jar, which also carries KafkaIO. Python pipelines use Beam's
cross-language `ReadFromKafka` / `WriteToKafka` with ``expansion_service=`` the address `expansion_service`
yields; the expanded Java transforms run in an EMBEDDED environment, i.e. inside the Flink job server's
JVM (there is no Docker here for Beam's default Java environment).

Tests start their own broker on a free port (`start_kafka`, the ``kafka_broker`` fixture); `stack up`
is for people and demos. `flink_job_server` runs Beam's Flink job server for a block (one per test session,
one per `run_pipeline` otherwise). Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from headrace.core.errors import HeadraceError
from headrace.runners import jars

__all__ = [
    "KafkaBroker",
    "create_topics",
    "end_offsets",
    "expansion_service",
    "flink_job_server",
    "free_port",
    "start_kafka",
    "status",
    "stop",
]

_log = logging.getLogger(__name__)


class StackError(HeadraceError):
    """A stack component did not start (the message carries the end of its log)."""


@dataclasses.dataclass(frozen=True)
class KafkaBroker:
    bootstrap: str
    pid: int
    workdir: str

    @property
    def log(self) -> Path:
        return Path(self.workdir) / "broker.log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions={partitions}
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
"""


def start_kafka(
    *, port: int = 0, workdir: str | os.PathLike | None = None, partitions: int = 1, timeout: float = 90.0
) -> KafkaBroker:
    """Formats a KRaft log directory under `workdir` and starts a broker; returns once it accepts
    connections. Raises StackError with the end of the broker's log when it does not."""
    jar = jars.jar_path("kafka-broker")
    port = port or free_port()
    controller = free_port()
    work = Path(workdir) if workdir else jars.cache_dir() / "stack" / f"kafka-{port}"
    work.mkdir(parents=True, exist_ok=True)
    props = work / "server.properties"
    props.write_text(
        _PROPERTIES.format(port=port, controller=controller, data=work / "data", partitions=partitions)
    )
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    fmt = subprocess.run(
        [
            "java",
            "-cp",
            str(jar),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(props),
            "--ignore-formatted",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if fmt.returncode != 0:
        raise StackError(f"kafka: formatting {work / 'data'} failed:\n{(fmt.stdout + fmt.stderr)[-2000:]}")
    log = work / "broker.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["java", "-Xmx512m", "-cp", str(jar), "kafka.Kafka", str(props)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not killed with the terminal that started it
        )
    broker = KafkaBroker(bootstrap=f"127.0.0.1:{port}", pid=proc.pid, workdir=str(work))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"kafka: the broker exited with {proc.returncode}:\n{_tail(log)}")
        if _listening(port) and "Kafka Server started" in log.read_text(errors="replace"):
            _log.info("kafka broker on %s (pid %d, log %s)", broker.bootstrap, proc.pid, log)
            return broker
        time.sleep(0.5)
    stop(broker)
    raise StackError(f"kafka: no broker on {broker.bootstrap} after {timeout:.0f}s:\n{_tail(log)}")


def stop(broker: KafkaBroker, timeout: float = 30.0) -> None:
    """SIGTERM (Kafka shuts down cleanly), then SIGKILL after `timeout`."""
    if not _alive(broker.pid):
        return
    os.kill(broker.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(broker.pid, os.WNOHANG) != (0, 0):
                return
        if not _alive(broker.pid):
            return
        time.sleep(0.2)
    os.kill(broker.pid, signal.SIGKILL)


# -- `headrace stack` ------------------------------------------------------------------------------


def _state_file() -> Path:
    return jars.cache_dir() / "stack" / "kafka.json"


def status() -> KafkaBroker | None:
    """The broker `stack up` started, if it still runs."""
    path = _state_file()
    if not path.is_file():
        return None
    broker = KafkaBroker(**json.loads(path.read_text()))
    return broker if _alive(broker.pid) else None


def up(port: int = 9092) -> KafkaBroker:
    running = status()
    if running is not None:
        return running
    if _listening(port):
        raise StackError(f"kafka: port {port} is taken by another process; choose --kafka-port")
    broker = start_kafka(port=port)
    _state_file().write_text(json.dumps(dataclasses.asdict(broker)))
    return broker


def down() -> bool:
    broker = status()
    if broker is None:
        return False
    stop(broker)
    _state_file().unlink(missing_ok=True)
    return True


# -- topics ----------------------------------------------------------------------------------------


_TIMEOUT_S = 20.0


def _check(futures: dict, what: str, ok_codes=()) -> dict[str, bool]:
    """Waits for an admin request per topic; ``{topic: True}`` when done, False for an allowed error."""
    from confluent_kafka import KafkaException

    done = {}
    for topic, future in futures.items():
        try:
            future.result(_TIMEOUT_S)
            done[topic] = True
        except KafkaException as exc:
            if exc.args[0].code() not in ok_codes:
                raise StackError(f"kafka {what} {topic}: {exc.args[0].str()}") from exc
            done[topic] = False
    return done


def _admin_client(bootstrap: str):
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": int(_TIMEOUT_S * 1000)})


def create_topics(bootstrap: str, topics, partitions: int = 1) -> list[str]:
    """Creates the topics that do not exist yet (with `partitions` each); returns those created.

    Consumers need their topics to exist: KafkaIO lists a topic's partitions once, at start, and a read
    of a topic without partitions finishes at once (seen: the join job ending as soon as it started)."""
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import NewTopic

    topics = list(dict.fromkeys(topics))
    if not topics:
        return []
    admin = _admin_client(bootstrap)  # in-process: the Java AdminClient cost a JVM start per call
    futures = admin.create_topics([NewTopic(t, partitions, 1) for t in topics], request_timeout=_TIMEOUT_S)
    done = _check(futures, "create topic", ok_codes=(KafkaError.TOPIC_ALREADY_EXISTS,))
    return [t for t in topics if done[t]]


def add_partitions(bootstrap: str, topics, partitions: int) -> None:
    """Grows the topics to `partitions` partitions each (Kafka only ever adds partitions)."""
    from confluent_kafka.admin import NewPartitions

    admin = _admin_client(bootstrap)
    _check(admin.create_partitions([NewPartitions(t, partitions) for t in topics]), "grow topic")


def produce_lines(bootstrap: str, topic: str, path: str | os.PathLike, partition: int = 0) -> int:
    """Sends each line of `path` to one partition of `topic`, in order (an idempotent producer: no
    duplicates, no reordering on retries); returns how many."""
    from confluent_kafka import Producer

    errors: list[str] = []
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    n = 0
    with open(path, "rb") as f:
        for line in f:
            value = line.rstrip(b"\r\n")
            while True:
                try:
                    producer.produce(
                        topic,
                        value,
                        partition=partition,
                        on_delivery=lambda err, _: err and errors.append(str(err)),
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
            n += 1
    if producer.flush(60) or errors:
        raise StackError(f"kafka produce {topic}[{partition}] from {path}: not delivered: {errors[:3]}")
    return n


def end_offsets(bootstrap: str, topics) -> dict[tuple[str, int], int]:
    """``{(topic, partition): end offset}`` for every partition of the topics (which must exist)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "headrace-offsets", "enable.auto.commit": False}
    )
    try:
        out = {}
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=_TIMEOUT_S).topics[topic]
            if meta.error is not None or not meta.partitions:
                raise StackError(f"kafka offsets {topic}: no such topic on {bootstrap} ({meta.error})")
            for p in sorted(meta.partitions):
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=_TIMEOUT_S)
                out[(topic, p)] = high
        return out
    finally:
        consumer.close()


# -- KafkaIO expansion service ---------------------------------------------------------------------


@contextlib.contextmanager
def _service(what: str, command: list[str], port: int, log: Path, timeout: float) -> Iterator[str]:
    """Runs `command` (a JVM serving on `port`) for the block's duration; yields ``localhost:PORT`` once it
    accepts connections. Raises StackError with the end of its log when it does not start."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"{what} did not start:\n{_tail(log)}")
            time.sleep(0.3)
        _log.info("%s on localhost:%d (pid %d)", what, port, proc.pid)
        yield f"localhost:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def expansion_service(timeout: float = 60.0, experiments=()) -> Iterator[str]:
    """Runs the KafkaIO expansion service (from the Flink job-server jar) for the block's duration and
    yields its ``localhost:PORT``. Transforms it expands run EMBEDDED in the Flink job server."""
    jar = jars.jar_path("flink-job-server")
    port = free_port()
    log = jars.cache_dir() / "stack" / f"expansion-{port}.log"
    command = [
        "java",
        "-cp",
        str(jar),
        "org.apache.beam.sdk.expansion.service.ExpansionService",
        str(port),
        "--defaultEnvironmentType=EMBEDDED",
        *(f"--experiments={e}" for e in experiments),
    ]
    try:
        with _service("KafkaIO expansion service", command, port, log, timeout) as address:
            yield address
    finally:
        log.unlink(missing_ok=True)


# -- Flink job server ------------------------------------------------------------------------------


@contextlib.contextmanager
def flink_job_server(flink_master: str = "[local]", timeout: float = 120.0) -> Iterator[str]:
    """Runs Beam's Flink job server (the jar `make jars` builds) for the block's duration and yields its
    job endpoint ``localhost:PORT``, for ``--job_endpoint``.

    Beam starts one job server per pipeline run when none is given and stops it only when the Python
    process exits (about 1 GB each): a process that runs several Flink pipelines (a test session, a
    benchmark) shares one through this, and a run through `headrace.runners.beam_runner.run_pipeline`
    without ``--job_endpoint`` gets its own, stopped when the run ends. With ``[local]`` the job server
    runs the pipeline on an embedded Flink cluster in its own JVM."""
    import tempfile

    jar = jars.jar_path("flink-job-server")
    port = free_port()
    artifacts = tempfile.mkdtemp(prefix="headrace-flink-artifacts-")
    command = ["java", "-jar", str(jar), "--flink-master", flink_master, "--artifacts-dir", artifacts]
    command += ["--job-port", str(port), "--artifact-port", "0", "--expansion-port", "0"]
    try:
        with _service(
            "Flink job server", command, port, Path(artifacts) / "job-server.log", timeout
        ) as address:
            yield address
    finally:
        shutil.rmtree(artifacts, ignore_errors=True)
