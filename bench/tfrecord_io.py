"""Benchmark: writing TFRecords with Beam and reading them with headrace's tf.data reader.

    python bench/tfrecord_io.py [--records 200000] [--repeats 3]

Rows (examples/s, median of --repeats runs, ratio against the baseline in the same run):
  write  Beam WriteTFRecordShards on FnApiRunner (1 worker, and 2 worker processes)
         vs a plain loop of spec.encode + tf.io.TFRecordWriter (one process, no Beam)
  read   tfrecord_dataset (parallel interleave, batched parse, prefetch; batch 1024)
         vs a naive reader: one file after another, one example at a time, parse_single_example
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import apache_beam as beam
import tensorflow as tf

from headrace.pipelines.example import EXAMPLE_SPEC, generate_lines, parse_line
from headrace.runners.beam_runner import run_pipeline
from headrace.transforms.tfrecord import WriteTFRecordShards, tfrecord_dataset

SHARDS = 8


def make_records(start: int, count: int) -> list[dict]:
    """Records of the example spec, from the example pipeline's generator (importable by workers)."""
    return [parse_line(line) for line in generate_lines(0, start, count, malformed_every=0)]


@dataclasses.dataclass(frozen=True)
class WriteConfig:
    output: str
    records: int


def build_write(pipeline, config: WriteConfig):
    chunk = 10_000
    (
        pipeline
        | beam.Create([(s, min(chunk, config.records - s)) for s in range(0, config.records, chunk)])
        # Default argument: worker processes have no __main__ globals (save_main_session is off).
        | beam.FlatMap(lambda sc, gen=generate_lines: gen(0, sc[0], sc[1], 0))
        | beam.Map(parse_line)
        | WriteTFRecordShards(EXAMPLE_SPEC, f"{config.output}/part", SHARDS)
    )


def beam_write(root: str, n: int, workers: int) -> float:
    out = f"{root}/beam-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    args = [f"--direct_num_workers={workers}"]
    if workers > 1:
        args.append("--direct_running_mode=multi_processing")
    start = time.perf_counter()
    run_pipeline(build_write, WriteConfig(out, n), beam_args=args)
    return n / (time.perf_counter() - start)


def plain_write(root: str, n: int) -> float:
    out = f"{root}/plain"
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    start = time.perf_counter()
    writers = [tf.io.TFRecordWriter(f"{out}/part-{i:05d}.tfrecord") for i in range(SHARDS)]
    for s in range(0, n, 10_000):
        for j, record in enumerate(make_records(s, min(10_000, n - s))):
            writers[j % SHARDS].write(EXAMPLE_SPEC.encode(record))
    for w in writers:
        w.close()
    return n / (time.perf_counter() - start)


def ours_read(pattern: str) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for batch in tfrecord_dataset(pattern, EXAMPLE_SPEC, 1024):
        n += int(batch["label"].shape[0])
    return n / (time.perf_counter() - start), n


def naive_read(pattern: str) -> tuple[float, int]:
    features = EXAMPLE_SPEC.tf_features()
    start = time.perf_counter()
    n = 0
    for f in sorted(tf.io.gfile.glob(pattern)):
        for serialized in tf.data.TFRecordDataset(f):
            tf.io.parse_single_example(serialized, features)
            n += 1
    return n / (time.perf_counter() - start), n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-records", type=int, default=50_000, help="the naive reader reads this many")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench-tfrecord-")
    try:
        results = {k: [] for k in ("beam1", "beam2", "plain", "ours", "naive")}
        for _ in range(args.repeats):
            results["plain"].append(plain_write(root, args.records))
            results["beam1"].append(beam_write(root, args.records, 1))
            results["beam2"].append(beam_write(root, args.records, 2))
            results["ours"].append(ours_read(f"{root}/beam-1/part-*")[0])
            # The naive reader is slow: it reads a prefix of the shards of the same data.
            naive_root = f"{root}/naive"
            if not os.path.exists(naive_root):
                os.makedirs(naive_root)
                per = args.naive_records // SHARDS
                for i, f in enumerate(sorted(tf.io.gfile.glob(f"{root}/beam-1/part-*"))):
                    with tf.io.TFRecordWriter(f"{naive_root}/part-{i:05d}.tfrecord") as w:
                        for rec in tf.data.TFRecordDataset(f).take(per):
                            w.write(rec.numpy())
            results["naive"].append(naive_read(f"{naive_root}/part-*")[0])
        med = {k: statistics.median(v) for k, v in results.items()}
        print(
            f"\nTFRecord I/O, {args.records:,} example records, {SHARDS} shards, "
            f"median of {args.repeats} (cores: {os.cpu_count()})"
        )
        print(f"{'step':<7}{'ours':<44}{'ex/s':>12}  {'baseline':<40}{'ex/s':>12}  {'ratio':>6}")
        rows = [
            (
                "write",
                "Beam FnApiRunner, 1 worker",
                med["beam1"],
                "plain loop encode + TFRecordWriter",
                med["plain"],
            ),
            (
                "write",
                "Beam FnApiRunner, 2 worker processes",
                med["beam2"],
                "plain loop encode + TFRecordWriter",
                med["plain"],
            ),
            (
                "read",
                "tfrecord_dataset (batch 1024)",
                med["ours"],
                "naive: one example at a time",
                med["naive"],
            ),
        ]
        for step, ours, a, base, b in rows:
            print(f"{step:<7}{ours:<44}{a:>12,.0f}  {base:<40}{b:>12,.0f}  {a / b:>5.1f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
