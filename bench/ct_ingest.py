"""Benchmark: the CT ingest (Beam) and the CT tf.data reader, beside a plain pydicom + numpy loop.

    python bench/ct_ingest.py [--series 12] [--slices 96] [--size 256] [--repeats 3]

Writes --series generated axial CT series (int16, slope/intercept, shuffled file names) and measures
(median of --repeats; MB = float32 HU volume bytes produced; ratio = ours / baseline, same run):

  ingest  headrace ct-ingest on FnApiRunner (1 worker; 2 worker processes): list, read headers, group by
          series, check geometry, read and stack pixels in HU, write shards and the manifest
          (previews off; on, they add ~0.1 s per volume)
          vs a plain loop: per series folder, pydicom.dcmread every file, sort by z, stack
          pixel_array * slope + intercept (no checks, no output written)
  read    headrace.pipelines.ct.volume_dataset over the written shards (whole volumes as tensors)
          vs the same plain pydicom loop (what a training loop that re-reads DICOM each epoch pays)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import tensorflow as tf  # noqa: E402, F401  (imported before timing: the reader's figure excludes it)

from headrace.pipelines import ct_data  # noqa: E402
from headrace.pipelines.ct import CtIngestConfig, build_ct_ingest, volume_dataset  # noqa: E402
from headrace.runners.beam_runner import run_pipeline  # noqa: E402


def make_study(root: Path, series: int, slices: int, size: int) -> list[Path]:
    dirs = []
    for s in range(series):
        hu = ct_data.phantom((slices, size, size), seed=s).hu
        d = root / f"patient{s:03d}"
        ct_data.write_dicom_series(d, hu, slope=1.0, intercept=-1024.0, seed=s)
        dirs.append(d)
    return dirs


def plain_loop(dirs: list[Path]) -> tuple[float, float]:
    """Seconds and MB for the straightforward per-series read."""
    start = time.perf_counter()
    nbytes = 0
    for d in dirs:
        slices = [pydicom.dcmread(f) for f in d.iterdir()]
        slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
        volume = np.stack(
            [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices]
        ).astype(np.float32)
        nbytes += volume.nbytes
    return time.perf_counter() - start, nbytes / 2**20


def beam_ingest(src: Path, out: Path, procs: int) -> float:
    args = [] if procs <= 1 else [f"--direct_num_workers={procs}", "--direct_running_mode=multi_processing"]
    config = CtIngestConfig(input=str(src), output=str(out), previews=False, shards=4)
    start = time.perf_counter()
    run_pipeline(build_ct_ingest, config, beam_args=args, overwrite=True)
    return time.perf_counter() - start


def reader(out: Path) -> tuple[float, int]:
    """One pass over the volumes, the dataset already built (as a training loop's epochs are)."""
    ds = volume_dataset(str(out))
    next(iter(ds))  # graph construction and the first file open, once per training run
    start = time.perf_counter()
    n = 0
    for v in ds:
        n += int(v["volume"].shape[0] > 0)
    return time.perf_counter() - start, n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--series", type=int, default=12)
    parser.add_argument("--slices", type=int, default=96)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-ct-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        dirs = make_study(root / "in", args.series, args.slices, args.size)
        print(
            f"# {args.series} series x {args.slices} slices x {args.size}^2 written in "
            f"{time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
        )
        plain, beam1, beam2, read = [], [], [], []
        mb = 0.0
        for r in range(args.repeats):
            seconds, mb = plain_loop(dirs)
            plain.append(seconds)
            beam1.append(beam_ingest(root / "in", root / "out", 1))
            beam2.append(beam_ingest(root / "in", root / "out2", 2))
            seconds, n = reader(root / "out")
            assert n == args.series, n
            read.append(seconds)
            print(
                f"# repeat {r}: plain {plain[-1]:.2f}s beam1 {beam1[-1]:.2f}s beam2 {beam2[-1]:.2f}s "
                f"read {read[-1]:.2f}s",
                file=sys.stderr,
            )

    n = args.series
    med = statistics.median

    def row(name, ours, base):
        print(
            f"| {name} | {n / med(ours):.2f} vol/s, {mb / med(ours):.0f} MB/s | "
            f"{n / med(base):.2f} vol/s, {mb / med(base):.0f} MB/s | {med(base) / med(ours):.2f}x |"
        )

    print(f"\n{n} volumes, {mb:.0f} MB of float32 HU; medians of {args.repeats}\n")
    print("| step | headrace | plain pydicom + numpy loop | ratio |")
    print("|---|---|---|---|")
    row("ingest, FnApiRunner 1 worker", beam1, plain)
    row("ingest, 2 worker processes", beam2, plain)
    row("read (tf.data volume_dataset)", read, plain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
