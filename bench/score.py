"""Benchmark: ``headrace run ctr-score`` (Beam's RunInference) against the SavedModel called from Python.

    python bench/score.py [--lines 60000] [--repeats 3] [--runner FnApiRunner]

One model (DeepFM, embedding 16, MLP 256-128, trained 30 steps on generated logs) scores one file of
--lines Criteo-format lines, three ways, each timed from the file on disk to the probabilities written:

* ``ctr-score``: the whole pipeline (read, parse, RunInference with Beam's own batching, write the scores,
  the report), on the in-process FnApiRunner: the time of ``headrace run ctr-score``;
* Python loop, per line: read a line, split it, call ``serving_default`` on it, write one row: what a
  hand-written scorer that calls the model per request does;
* Python loop, batched: the same with the lines fed 1,024 at a time (the best a plain loop does).

Lines/s is lines scored per second of wall time, the median of --repeats; ratios are ctr-score's over the
loop's, in this run. The pipeline's time includes Beam's job start-up (about 5 s here), so on small files
the loop is ahead; the bench prints that constant too.
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

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from headrace.models.criteo import FIELDS  # noqa: E402
from headrace.pipelines import ctr, ctr_score  # noqa: E402
from headrace.pipelines.ctr_data import generate  # noqa: E402
from headrace.runners.beam_runner import run_pipeline  # noqa: E402
from headrace.runners.train_ctr import CTRTrainConfig, train_and_evaluate  # noqa: E402


def _model(root: Path) -> str:
    generate(root / "train.tsv", 20000, seed=1)
    run_pipeline(
        ctr.build_ctr_ingest, ctr.CtrIngestConfig(input=str(root / "train.tsv"), output=str(root / "data"))
    )
    config = CTRTrainConfig(
        data=str(root / "data"),
        output=str(root / "model"),
        steps=30,
        batch_size=256,
        mesh="",
        log_every_seconds=60,
    )
    train_and_evaluate(config)
    return ctr_score.resolve_model(str(root / "model"))


def _pipeline(model: str, path: Path, out: Path, runner: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    config = ctr_score.CtrScoreConfig(model=model, input=str(path), output=str(out), shards=2)
    run_pipeline(ctr_score.build_ctr_score, config, runner=runner)


def _loop(model: str, path: Path, out: Path, batch: int) -> None:
    serve = tf.saved_model.load(model).signatures["serving_default"]

    def flush(rows, numbers, f):
        cols = np.array(rows, dtype=object)
        feed = {name: tf.constant(cols[:, k].astype(str)) for k, name in enumerate(FIELDS)}
        for n, p in zip(numbers, serve(**feed)["probability"].numpy()):
            f.write(f"{path}\t{n}\t{p:.7g}\n")

    with open(path) as src, open(out, "w") as f:
        rows, numbers = [], []
        for number, line in enumerate(src, 1):
            rows.append(line.rstrip("\n").split("\t")[1:])
            numbers.append(number)
            if len(rows) == batch:
                flush(rows, numbers, f)
                rows, numbers = [], []
        if rows:
            flush(rows, numbers, f)


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=60000)
    parser.add_argument(
        "--per-line", type=int, default=3000, help="lines the per-line loop scores (it is slow)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runner", default="FnApiRunner")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        model = _model(root)
        logs = root / "logs.tsv"
        generate(logs, args.lines, seed=2)
        head = root / "head.tsv"
        with open(logs) as src:
            head.write_text("".join(line for _, line in zip(range(args.per_line), src)))
        tiny = root / "tiny.tsv"
        generate(tiny, 10, seed=3)

        startup = _timed(lambda: _pipeline(model, tiny, root / "o0", args.runner), args.repeats)
        beam_s = _timed(lambda: _pipeline(model, logs, root / "o1", args.runner), args.repeats)
        batched_s = _timed(lambda: _loop(model, logs, root / "b.tsv", 1024), args.repeats)
        per_line_s = _timed(lambda: _loop(model, head, root / "p.tsv", 1), 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ours = args.lines / beam_s
    rows = [
        ("ctr-score (RunInference)", args.lines, beam_s, ours),
        ("Python loop, batched 1024", args.lines, batched_s, args.lines / batched_s),
        ("Python loop, per line", args.per_line, per_line_s, args.per_line / per_line_s),
    ]
    print(f"\nctr-score vs the SavedModel called from Python ({args.runner}, median of {args.repeats})")
    print(f"{'':28} {'lines':>8} {'seconds':>9} {'lines/s':>10} {'ctr-score / this':>17}")
    for name, n, s, rate in rows:
        print(f"{name:28} {n:8d} {s:9.2f} {rate:10.0f} {ours / rate:16.2f}x")
    print(f"{'ctr-score on 10 lines':28} {10:8d} {startup:9.2f}   (the job's fixed start-up cost)")


if __name__ == "__main__":
    sys.exit(main())
