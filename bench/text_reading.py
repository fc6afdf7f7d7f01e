"""Benchmark: what reading text through TextReader (binary / UTF-8 / line-length checks, stream
decompression that keeps the bytes before damage) costs against Arrow reading the file directly.

    python bench/text_reading.py [--lines 1000000] [--repeats 3]

Rows (median of --repeats, lines/s; ratio = ours / baseline in the same run):
  tsv       iter_csv_batches (TextReader -> Arrow CSV) vs Arrow's CSV reader on the raw file
  tsv.gz    the same on gzip; the baseline decompresses with pyarrow.CompressedInputStream
  lines.gz  TextReader.lines() vs Python's gzip.open line iteration (what ReadLines replaced)
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import pyarrow as pa  # noqa: E402
import pyarrow.csv as pcsv  # noqa: E402

from headrace.pipelines.ctr import COLUMNS  # noqa: E402
from headrace.pipelines.ctr_data import generate  # noqa: E402
from headrace.transforms.columnar import CsvBatch, iter_csv_batches  # noqa: E402
from headrace.transforms.textfiles import TextReader  # noqa: E402


def ours_csv(path: str) -> int:
    n = 0
    for item in iter_csv_batches(
        path, COLUMNS, delimiter="\t", header=False, column_names=COLUMNS, quoting=False
    ):
        if isinstance(item, CsvBatch):
            n += item.num_rows
    return n


def arrow_csv(path: str) -> int:
    source = pa.OSFile(path)
    if path.endswith(".gz"):
        source = pa.CompressedInputStream(source, "gzip")
    reader = pcsv.open_csv(
        source,
        read_options=pcsv.ReadOptions(use_threads=False, block_size=1 << 22, column_names=COLUMNS),
        parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=False),
        convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS}),
    )
    return sum(batch.num_rows for batch in reader)


def ours_lines(path: str) -> int:
    with TextReader(path) as reader:
        return sum(1 for _ in reader.lines())


def python_lines(path: str) -> int:
    with gzip.open(path, "rb") as f:
        return sum(1 for line in f if line.decode("utf-8", errors="replace"))


def median_rate(fn, path: str, repeats: int) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn(path)
        times.append(time.perf_counter() - start)
    return n / statistics.median(times), n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-text-"))
    try:
        tsv = generate(work / "log.tsv", args.lines, seed=0).path
        gz = work / "log.tsv.gz"
        with open(tsv, "rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        rows = [
            ("tsv", ours_csv, arrow_csv, tsv),
            ("tsv.gz", ours_csv, arrow_csv, str(gz)),
            ("lines.gz", ours_lines, python_lines, str(gz)),
        ]
        print(f"{args.lines:,} Criteo lines, median of {args.repeats}")
        print(f"{'file':<10} {'ours lines/s':>14} {'baseline lines/s':>17} {'ratio':>7}")
        for name, ours, base, path in rows:
            (r_ours, n_ours), (r_base, n_base) = (
                median_rate(ours, path, args.repeats),
                median_rate(base, path, args.repeats),
            )
            assert n_ours == n_base == args.lines, (name, n_ours, n_base)
            print(f"{name:<10} {r_ours:>14,.0f} {r_base:>17,.0f} {r_ours / r_base:>6.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
