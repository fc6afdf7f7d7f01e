"""Benchmark: CTR ingest (Beam) and the CTR tf.data reader, beside a pandas + per-row baseline.

    python bench/ctr_ingest.py [--lines 1000000] [--repeats 3]

Rows (median of --repeats, ratio = ours / baseline in the same run):
  ingest  headrace ctr-ingest on FnApiRunner (1 worker; 2 worker processes): read, validate, split,
          encode, write shards, statistics and vocabularies
          vs pandas.read_csv + a per-row parse (validate, convert) + encode + TFRecordWriter, one process
          (no statistics)
  read    headrace.pipelines.ctr.dataset (batch 1024) vs one example at a time (parse_single_example)
The reader's figure is what bench/ctr_train.py compares with the DeepFM trainer's consumption.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402

from headrace.pipelines.ctr import CTR_SPEC, CtrIngestConfig, build_ctr_ingest, dataset  # noqa: E402
from headrace.pipelines.ctr_data import CAT_FIELDS, INT_FIELDS, generate  # noqa: E402
from headrace.runners.beam_runner import run_pipeline  # noqa: E402


def beam_ingest(src: str, out: Path, procs: int) -> float:
    args = [] if procs <= 1 else [f"--direct_num_workers={procs}", "--direct_running_mode=multi_processing"]
    start = time.perf_counter()
    run_pipeline(
        build_ctr_ingest, CtrIngestConfig(input=src, output=str(out)), beam_args=args, overwrite=True
    )
    return time.perf_counter() - start


def pandas_ingest(src: str, out: Path) -> float:
    """A straightforward single-process ingest: read_csv, parse each row, encode, write."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    df = pd.read_csv(src, sep="\t", header=None, dtype=str, keep_default_na=False, quoting=3)
    writers = [tf.io.TFRecordWriter(str(out / f"train-{i:05d}.tfrecord")) for i in range(8)]
    for n, row in enumerate(df.itertuples(index=False, name=None)):
        if len(row) != 40 or row[0] not in ("0", "1"):
            continue
        try:
            ints = [int(v) if v else 0 for v in row[1:14]]
        except ValueError:
            continue
        record = {
            "label": int(row[0]),
            "I": ints,
            "I_missing": [int(v == "") for v in row[1:14]],
            "C": list(row[14:40]),
        }
        writers[n % 8].write(CTR_SPEC.encode(record))
    for w in writers:
        w.close()
    return time.perf_counter() - start


def ours_read(out: Path) -> tuple[float, int]:
    start = time.perf_counter()
    n = sum(int(b["label"].shape[0]) for b in dataset(str(out), "train", 1024))
    return n / (time.perf_counter() - start), n


def naive_read(out: Path, limit: int) -> float:
    features = CTR_SPEC.tf_features()
    files = sorted(str(p) for p in out.glob("train-*.tfrecord"))
    start = time.perf_counter()
    n = 0
    for serialized in tf.data.TFRecordDataset(files).take(limit):
        tf.io.parse_single_example(serialized, features)
        n += 1
    return n / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    assert len(INT_FIELDS) + len(CAT_FIELDS) == 39
    root = Path(tempfile.mkdtemp(prefix="bench-ctr-"))
    try:
        src = generate(root / "log.tsv", args.lines, seed=0).path
        res = {k: [] for k in ("beam1", "beam2", "pandas", "read", "naive")}
        for _ in range(args.repeats):
            res["beam1"].append(args.lines / beam_ingest(src, root / "beam1", 1))
            res["beam2"].append(args.lines / beam_ingest(src, root / "beam2", 2))
            res["pandas"].append(args.lines / pandas_ingest(src, root / "pandas"))
            res["read"].append(ours_read(root / "beam1")[0])
            res["naive"].append(naive_read(root / "beam1", 50_000))
        med = {k: statistics.median(v) for k, v in res.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"\nCTR ingest, {args.lines:,} Criteo-format lines, median of {args.repeats} (cores: {os.cpu_count()})"
    )
    print(f"{'step':<7}{'ours':<46}{'per s':>10}  {'baseline':<44}{'per s':>10}  {'ratio':>6}")
    base = "pandas read_csv + per-row parse + encode"
    rows = [
        ("ingest", "Beam FnApiRunner, 1 worker (lines)", med["beam1"], base, med["pandas"]),
        ("ingest", "Beam FnApiRunner, 2 worker processes", med["beam2"], base, med["pandas"]),
        ("read", "ctr.dataset, batch 1024 (examples)", med["read"], "one example at a time", med["naive"]),
    ]
    for step, ours, a, baseline, b in rows:
        print(f"{step:<7}{ours:<46}{a:>10,.0f}  {baseline:<44}{b:>10,.0f}  {a / b:>5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
