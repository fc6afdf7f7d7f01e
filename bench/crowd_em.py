"""Benchmark: crowd-labels EM on 1M and 10M annotations beside crowd-kit and a vectorised numpy EM.

    make bench-deps                       # crowd-kit, for this benchmark only
    python bench/crowd_em.py [--sizes 1000000,10000000] [--iterations 20] [--workers-procs 1]

Data: generated (headrace.pipelines.crowd_data), T tasks x 10 labels, 20k workers, 2 classes, 4 annotator
groups with distinct biases; the same CSV for every implementation. All run exactly `--iterations` EM
iterations (tolerance 0). Times:
  * headrace: wall time of the whole Beam pipeline on the in-process FnApiRunner: CSV parsing,
    validation, grouping by task, EM, and every output file.
  * crowd-kit DawidSkene and the numpy EM (tests/pipelines/crowd_reference.py): fit only, from a
    DataFrame / arrays already in memory; their CSV read is timed separately and shown.
Accuracy is against the generated truth. Ratios are baseline time / headrace time (>1: headrace faster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the numpy reference

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from headrace.pipelines.crowd import CrowdConfig, build_crowd_labels  # noqa: E402
from headrace.pipelines.crowd_data import generate, group_bias_matrices  # noqa: E402
from headrace.runners.beam_runner import run_pipeline  # noqa: E402
from tests.pipelines import crowd_reference as ref  # noqa: E402


def accuracy(tasks, labels, truth: dict) -> float:
    return float(np.mean([truth[t] == lab for t, lab in zip(tasks, labels)]))


def run_headrace(data, root: Path, method: str, iterations: int, procs: int) -> tuple[float, float]:
    args = [] if procs <= 1 else [f"--direct_num_workers={procs}", "--direct_running_mode=multi_processing"]
    out = root / f"out-{method}"
    start = time.perf_counter()
    run_pipeline(
        build_crowd_labels,
        CrowdConfig(
            annotations=data.annotations,
            annotators=data.annotators,
            truth=data.truth,
            output=str(out),
            method=method,
            iterations=iterations,
            tolerance=0.0,
        ),
        beam_args=args,
        overwrite=True,
    )
    seconds = time.perf_counter() - start
    return seconds, json.loads((out / "report.json").read_text())["truth"]["accuracy"]


def run_crowdkit(df: pd.DataFrame, iterations: int, truth: dict) -> tuple[float, float] | None:
    try:
        from crowdkit.aggregation import DawidSkene
    except ImportError:
        return None
    start = time.perf_counter()
    labels = DawidSkene(n_iter=iterations, tol=0.0).fit_predict(df)
    seconds = time.perf_counter() - start
    return seconds, accuracy(labels.index, labels.to_numpy(), truth)


def run_numpy(d: ref.Data, method: str, iterations: int, truth: dict) -> tuple[float, float]:
    start = time.perf_counter()
    result = ref.run(d, method, iterations, 0.0)
    seconds = time.perf_counter() - start
    return seconds, accuracy(d.tasks, np.array(d.classes)[result["q"].argmax(1)], truth)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--workers-procs", type=int, default=1, help="FnApiRunner worker processes")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-crowd-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            root = Path(tmp) / str(n)
            data = generate(
                root,
                num_tasks=n // 10,
                num_workers=20_000,
                labels_per_task=10,
                num_classes=2,
                num_groups=4,
                group_matrices=group_bias_matrices(4, 2, accuracy=0.75, bias=0.2),
                with_text=False,
                seed=1,
            )
            t = pd.read_csv(data.truth, dtype=str)
            truth = dict(zip(t.task, t.label))
            start = time.perf_counter()
            df = pd.read_csv(data.annotations, dtype=str)
            read_pandas = time.perf_counter() - start
            start = time.perf_counter()
            d = ref.load(data.annotations, data.annotators)
            read_numpy = time.perf_counter() - start
            for method in ("dawid_skene", "groupanno"):
                ours = run_headrace(data, root, method, args.iterations, args.workers_procs)
                base = run_numpy(d, method, args.iterations, truth)
                rows.append((n, method, "headrace (Beam, FnApiRunner)", *ours, None, ours[0]))
                rows.append((n, method, "numpy EM (bincount)", *base, read_numpy, ours[0]))
                if method == "dawid_skene":
                    ck = run_crowdkit(df, args.iterations, truth)
                    if ck is None:
                        print("crowd-kit not installed: `make bench-deps`", file=sys.stderr)
                    else:
                        rows.append((n, method, "crowd-kit DawidSkene", *ck, read_pandas, ours[0]))
            del df, d
    print(
        f"\ncrowd-labels EM, {args.iterations} iterations, 2 classes, 20k workers (cores: {os.cpu_count()})"
    )
    print(
        f"{'annotations':>11}  {'method':<12} {'implementation':<30} {'seconds':>8} {'+read':>7} {'accuracy':>9} {'vs ours':>8}"
    )
    for n, method, impl, seconds, acc, read, ours in rows:
        read_s = "" if read is None else f"{read:.1f}"
        ratio = "" if impl.startswith("headrace") else f"{seconds / ours:.2f}x"
        print(f"{n:>11,}  {method:<12} {impl:<30} {seconds:>8.1f} {read_s:>7} {acc:>9.4f} {ratio:>8}")
    print("vs ours: baseline seconds / headrace seconds (headrace includes reading and writing files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
