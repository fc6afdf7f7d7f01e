"""Benchmark: one daily cycle of ``headrace retrain ctr``, and what a warm start buys over a cold one.

    python bench/retrain.py [--lines 20000] [--steps 60] [--repeats 1]

Logs are generated from one planted model (`headrace.pipelines.ctr_data.generate`), a golden set from the
same model. DeepFM, embedding 16, MLP 64-32, batch 256, on the in-process FnApiRunner and a 2-device mesh.

Table 1, time per daily cycle (seconds per stage, median of --repeats; each cycle a cold start, one
epoch over the day's train split): a day of --lines lines, and a day of 3x as many (three days of
traffic retrained in one cycle). The ratio column is the 3-day cycle's time over the 1-day cycle's.

Table 2, warm vs cold start after the same number of steps (--steps on day 2's data): the warm model
continues day 1's (weights, optimiser state, table rows); the cold one starts from scratch. First-step
loss and golden AUC of each; the warm start is ahead when its first loss is lower and its AUC higher.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

from headrace.core import mesh as mesh_lib  # noqa: E402

mesh_lib.configure_virtual_devices(2)

import json  # noqa: E402

from headrace.pipelines.ctr import CtrIngestConfig  # noqa: E402
from headrace.pipelines.ctr_data import generate  # noqa: E402
from headrace.runners import retrain  # noqa: E402
from headrace.runners.ctr_task import CTRTrainConfig  # noqa: E402

TRAIN = dict(
    batch_size=256, embedding_dim=16, hidden=(64, 32), capacity=1 << 17, mesh="batch=2", log_every_seconds=60
)


def _config(logs: Path, mroot: Path, date: str, golden: Path, **train) -> retrain.CTRRetrainConfig:
    return retrain.CTRRetrainConfig(
        logs=str(logs),
        date=date,
        models=str(mroot),
        golden=str(golden),
        ingest=CtrIngestConfig(shards=4),
        train=CTRTrainConfig(**TRAIN, **train),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench-retrain-"))
    try:
        logs = root / "logs"
        golden = root / "golden.tsv"
        generate(golden, 5000, seed=99)
        generate(logs / "dt=2026-11-01" / "part-0.tsv", args.lines, seed=1)
        generate(logs / "dt=2026-11-02" / "part-0.tsv", args.lines, seed=2)
        for k in range(3):  # three days' traffic in one day folder
            generate(logs / "dt=2026-11-03" / f"part-{k}.tsv", args.lines, seed=10 + k)

        cycles = {}
        for label, date in (("1 day", "2026-11-01"), ("3 days", "2026-11-03")):
            runs = []
            for r in range(args.repeats):
                decision = retrain.retrain_ctr(_config(logs, root / f"cycle-{date}-{r}", date, golden))
                runs.append(decision["seconds"])
            cycles[label] = {s: statistics.median(run[s] for run in runs) for s in runs[0]}

        warm_root, cold_root = root / "warm", root / "cold"
        retrain.retrain_ctr(_config(logs, warm_root, "2026-11-01", golden, steps=args.steps))
        warm = retrain.retrain_ctr(_config(logs, warm_root, "2026-11-02", golden, steps=args.steps))
        cold = retrain.retrain_ctr(_config(logs, cold_root, "2026-11-02", golden, steps=args.steps))
        first = {
            name: json.loads((r / "2026-11-02" / "model" / "metrics.json").read_text())["loss_first"]
            for name, r in (("warm", warm_root), ("cold", cold_root))
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nretrain ctr: one daily cycle (seconds, median of {args.repeats}; {args.lines} lines a day)")
    print(f"{'stage':10} {'1 day':>8} {'3 days':>8} {'3 days / 1 day':>15}")
    for stage in ("ingest", "train", "evaluate"):
        one, three = cycles["1 day"][stage], cycles["3 days"][stage]
        print(f"{stage:10} {one:8.1f} {three:8.1f} {three / one:14.2f}x")
    one, three = sum(cycles["1 day"].values()), sum(cycles["3 days"].values())
    print(f"{'cycle':10} {one:8.1f} {three:8.1f} {three / one:14.2f}x")

    print(f"\nwarm vs cold start on day 2, {args.steps} steps each")
    print(f"{'':6} {'first loss':>11} {'golden AUC':>11} {'day AUC':>9}")
    for name, d in (("warm", warm), ("cold", cold)):
        print(
            f"{name:6} {first[name]:11.4f} {d['candidate_auc']:11.4f} {d['evaluation']['candidate_day_auc']:9.4f}"
        )
    print(
        f"{'warm - cold':>6} {first['warm'] - first['cold']:+10.4f} {warm['candidate_auc'] - cold['candidate_auc']:+11.4f}"
    )


if __name__ == "__main__":
    sys.exit(main())
