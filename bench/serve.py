"""Benchmark: `headrace serve ctr` under a bounded load on loopback while a new version is swapped in.

    python bench/serve.py [--seconds 10] [--clients 4] [--keys 100000]

A serving copy (DeepFM, --keys ids in its table, published as the online trainer publishes one) is served
by the CLI (`headrace serve ctr`, waitress, 8 threads) in its own process. For batches of 1 and 64
instances, --clients client threads (one keep-alive session each) send requests for --seconds; half-way
a second version is published and the server swaps to it. Reported: requests/s and instances/s, p50 /
p99 latency seen by the clients, failed requests (any status but 200), and the versions that answered.
Beside it, the same batches through the SavedModel in process (`ServingCopy.probability`, no HTTP): what
the HTTP layer, JSON and the client cost. The client and the server share the machine's 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np


def publish(root: Path, version: int, keys: int, shift: float) -> None:
    from headrace.models.ctr import CTRModel, CTRModelConfig
    from headrace.models.ctr_serving import ServingCTR, save_serving

    config = CTRModelConfig(name="deepfm", embedding_dim=16)
    rng = np.random.default_rng(version)
    dense = [v.numpy() for v in CTRModel(config).weights]
    ids = rng.choice(2**40, keys, replace=False).astype(np.int64) + 1
    module = ServingCTR(config, ids, rng.normal(0, 0.01, (keys, 16)), rng.normal(0, 0.01, (keys, 1)), dense,
                        np.ones(39), shift)  # fmt: skip
    staging = root / f".{version:08d}.staging"
    save_serving(module, staging)
    (staging / "sync.json").write_text(json.dumps({"version": version, "rows": keys}))
    os.replace(staging, root / f"{version:08d}")
    (root / ".LATEST.tmp").write_text(f"{version:08d}\n")
    os.replace(root / ".LATEST.tmp", root / "LATEST")


def instances(n: int, seed: int) -> list[dict]:
    from headrace.models.criteo import FIELDS
    from headrace.pipelines.ctr_data import generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "x.tsv", n, seed=seed)
        lines = (Path(tmp) / "x.tsv").read_text().splitlines()
    return [dict(zip(FIELDS, line.split("\t")[1:])) for line in lines[:n]]


def load(url: str, batch: list[dict], seconds: float, clients: int, on_half) -> dict:
    import requests

    latencies, codes, versions = [], [], set()
    lock = threading.Lock()
    end = time.monotonic() + seconds
    body = json.dumps({"instances": batch})

    def client():
        session = requests.Session()
        while time.monotonic() < end:
            t = time.perf_counter()
            r = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                codes.append(r.status_code)
                versions.add(r.headers.get("X-Model-Version"))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds / 2)
    on_half()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    lat = np.array(latencies)
    return {
        "requests_per_s": len(lat) / wall,
        "instances_per_s": len(lat) * len(batch) / wall,
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
        "failed": sum(c != 200 for c in codes),
        "requests": len(lat),
        "versions": sorted(v for v in versions if v),
    }


def in_process(root: Path, batch: list[dict], repeats: int = 200) -> dict:
    from headrace.models.criteo import FIELDS
    from headrace.runners.serving import ServingCopy

    copy = ServingCopy(root)
    columns = {k: [row[k] for row in batch] for k in FIELDS}
    copy.probability(columns)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        copy.probability(columns)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return {"requests_per_s": 1 / median, "instances_per_s": len(batch) / median, "p50_ms": median * 1000,
            "p99_ms": float(np.percentile(times, 99) * 1000)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--keys", type=int, default=100_000)
    args = parser.parse_args()
    import requests

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    publish(work, 1, args.keys, 0.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "headrace.runners.cli", "serve", "ctr", "--serving-dir", str(work),
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1/models/ctr:predict"
    rows = instances(64, seed=0)
    version = [1]

    def swap():
        version[0] += 1
        publish(work, version[0], args.keys, 0.5)

    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"http://127.0.0.1:{port}/v1/models/ctr", timeout=5).ok:
                    break
            time.sleep(0.3)
        results = {}
        for size in (1, 64):
            batch = rows[:size]
            load(url, batch, 2.0, args.clients, lambda: None)  # warm-up
            results[size] = (load(url, batch, args.seconds, args.clients, swap), in_process(work, batch))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    print(f"\n`headrace serve ctr` (waitress, 8 threads), {args.clients} client threads on loopback for "
          f"{args.seconds:g} s per row, a new version published half-way through each row:\n")  # fmt: skip
    print("| batch | requests/s | instances/s | p50 ms | p99 ms | failed | versions answering | "
          "in process (no HTTP): instances/s, p50 ms | HTTP / in process |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for size, (served, local) in results.items():
        print(f"| {size} | {served['requests_per_s']:,.0f} | {served['instances_per_s']:,.0f} | "
              f"{served['p50_ms']:.1f} | {served['p99_ms']:.1f} | {served['failed']} of {served['requests']:,} | "
              f"{', '.join(served['versions'])} | {local['instances_per_s']:,.0f}, {local['p50_ms']:.2f} | "
              f"{served['instances_per_s'] / local['instances_per_s']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
