"""Beyond one process, on one machine: 1 vs 2 DTensor clients, 1 vs 2 Flink TaskManagers.

    python bench/scale.py [--steps 60] [--lines 20000] [--repeats 3] [--skip-flink]

Training: the CTR trainer, 8 devices of ``batch=4,model=2``, global batch 1,024, as 1 client x 8 devices
and as 2 clients x 4 (``headrace launch``), both reading the input in 2 streams so they train the same
batches; examples/s is the loop's own (start-up and tracing excluded). Collectives: the median time of
the two things that cross clients in a CTR step, run in 1 and in 2 processes: the all-reduce of a 1 MiB
gradient-sized tensor and the all-gather of a batch's ids (1,024 x 39 int64). Flink: ctr-ingest of
`--lines` generated lines on a standalone cluster of 1 TaskManager x 2 slots (parallelism 2) vs 2 x 2
(parallelism 4), Python stages in TaskManager-started SDK workers (PROCESS); wall time of the whole run
(job server start and submission included, as a user waits for it) and lines/s from it.

Both sides share this machine's 2 cores: a second client or TaskManager adds processes, not hardware,
so ratios below 1 here say what the extra process costs (its collectives over loopback gRPC, its
serialisation), not what a second host would give. docs/scaling.md reads these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "headrace.runners.cli"]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}

_COLLECTIVE = r"""
import json, os, sys, time, statistics
clients = int(os.environ.get("DTENSOR_NUM_CLIENTS", "1"))
import tensorflow as tf
from tensorflow.experimental import dtensor
from headrace.core import cluster, mesh as mesh_lib
mesh_lib.configure_virtual_devices(8 // clients)
if clients > 1:
    cluster.initialize("CPU")
mesh = mesh_lib.create_mesh("batch=4,model=2")
lay = dtensor.Layout(["batch", dtensor.UNSHARDED], mesh)
grads = dtensor.pack([tf.ones([1, 262144])] * mesh.num_local_devices(), lay)  # 1 MiB per replica
reduce = tf.function(lambda g: tf.reduce_sum(g, axis=0))
ids = tf.zeros([1024 // clients, 39], tf.int64)
def timed(fn, n=30):
    fn()
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3
allreduce = timed(lambda: dtensor.unpack(reduce(grads))[0].numpy())
if clients > 1:
    gather = timed(lambda: cluster.gather(mesh, ids))
else:
    gather = timed(lambda: mesh_lib.to_numpy(mesh_lib.shard_batch(mesh, ids)))
if cluster.Clients.current().chief:
    print("RESULT " + json.dumps({"allreduce_ms": allreduce, "gather_ms": gather}), flush=True)
"""


def _ctr_data(root: Path, lines: int) -> Path:
    from headrace.pipelines.ctr import CtrIngestConfig, build_ctr_ingest
    from headrace.pipelines.ctr_data import generate
    from headrace.runners.beam_runner import run_pipeline

    log = generate(root / "log.tsv", lines, seed=7)
    out = root / "ctr"
    run_pipeline(build_ctr_ingest, CtrIngestConfig(input=log.path, output=str(out), shards=4))
    return out


def _train(data: Path, out: Path, clients: int, steps: int) -> float:
    args = ["train", "ctr", "--data", str(data), "--output", str(out), "--mesh", "batch=4,model=2",
            "--batch-size", "1024", "--steps", str(steps), "--input-shards", "2", "--no-export"]  # fmt: skip
    cmd = [*CLI, *args] if clients == 1 else [*CLI, "launch", "--clients", str(clients), "--", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())["examples_per_sec"]


def _collectives(clients: int) -> dict:
    from headrace.runners.launch import free_ports

    script = Path(tempfile.mkdtemp()) / "collective.py"
    script.write_text(_COLLECTIVE)
    if clients == 1:
        env = {k: v for k, v in ENV.items() if not k.startswith("DTENSOR_")}
        procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)]
    else:
        jobs = ",".join(f"127.0.0.1:{p}" for p in free_ports(clients))
        procs = [
            subprocess.Popen(
                [sys.executable, str(script)],
                stdout=subprocess.PIPE,
                text=True,
                env={
                    **ENV,
                    "DTENSOR_NUM_CLIENTS": str(clients),
                    "DTENSOR_CLIENT_ID": str(i),
                    "DTENSOR_JOB_NAME": "worker",
                    "DTENSOR_JOBS": jobs,
                },
            )
            for i in range(clients)
        ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for line in outs[0].splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"collective benchmark printed no result:\n{outs[0][-2000:]}")


def _flink(log: str, root: Path, taskmanagers: int) -> float:
    from headrace.pipelines.ctr import CtrIngestConfig, build_ctr_ingest
    from headrace.runners import flink_cluster as fc
    from headrace.runners.beam_runner import run_pipeline

    with fc.flink_cluster(taskmanagers=taskmanagers, slots=2, workdir=root / f"flink-{taskmanagers}") as c:
        t = time.perf_counter()
        run_pipeline(build_ctr_ingest, CtrIngestConfig(input=log, output=str(root / f"out-{taskmanagers}"),
                     shards=4), runner="flink", beam_args=c.beam_args(), overwrite=True)  # fmt: skip
        return time.perf_counter() - t


def _row(name: str, one: float, two: float, unit: str, higher_better: bool) -> str:
    ratio = two / one if one else float("nan")
    return f"| {name} | {one:,.2f} {unit} | {two:,.2f} {unit} | {ratio:.2f}x{'' if higher_better else ' (time)'} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-flink", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    data = _ctr_data(root, args.lines)
    rates = {1: [], 2: []}
    for r in range(args.repeats):
        for clients in (1, 2):
            rates[clients].append(_train(data, root / f"m{clients}-{r}", clients, args.steps))
    coll = {c: [_collectives(c) for _ in range(args.repeats)] for c in (1, 2)}

    def med(c, key):
        return statistics.median(x[key] for x in coll[c])

    rows = [
        "| measure | 1 process | 2 processes | 2 vs 1 |",
        "|---|---|---|---|",
        _row("CTR training, examples/s (1x8 vs 2x4 devices)", statistics.median(rates[1]),
             statistics.median(rates[2]), "ex/s", True),
        _row("all-reduce of 1 MiB per replica, ms", med(1, "allreduce_ms"), med(2, "allreduce_ms"), "ms", False),
        _row("ids all-gather (1,024 x 39 int64), ms", med(1, "gather_ms"), med(2, "gather_ms"), "ms", False),
    ]  # fmt: skip
    if not args.skip_flink:
        log = str(root / "log.tsv")
        walls = {1: [], 2: []}
        for _ in range(max(1, args.repeats - 1)):
            for tms in (1, 2):
                walls[tms].append(_flink(log, root, tms))
        one, two = statistics.median(walls[1]), statistics.median(walls[2])
        rows.append(_row(f"ctr-ingest of {args.lines:,} lines on Flink, s (1 vs 2 TaskManagers x 2 slots)",
                         one, two, "s", False))  # fmt: skip
        rows.append(_row("the same, lines/s", args.lines / one, args.lines / two, "lines/s", True))
    print(
        f"\nbench/scale.py on {os.cpu_count()} cores; medians of {args.repeats}; both sides share the cores\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
