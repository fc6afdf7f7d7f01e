"""Benchmark: DeepFM at batch 1K, 8K and 64K with plain Adam and with CowClip, same number of epochs.

    python bench/cowclip.py [--lines 4000000] [--epochs 1] [--mesh batch=1]

Plain Adam keeps the batch-1K hyperparameters at every batch size. CowClip (Zheng et al. 2022) clips
each id's summed embedding gradient to cnt * max(r ||w||, zeta), keeps the embedding learning rate, scales
the dense learning rate by sqrt(B / 1024) with a linear warm-up over half an epoch, and scales L2 by
B / 1024. The paper's claim: CowClip at 64K stays within 0.1% AUC of 1K while plain large-batch Adam
loses more, with a large speed-up per epoch. Prints AUC on the eval split and wall time per epoch.

One epoch over 4M lines by default: with several epochs over fewer lines the generated data is fitted
past its best by the small batches (eval AUC falls after the first epoch at 1K), which hides the
large-batch effect the benchmark is about.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

from headrace.core import mesh as mesh_lib  # noqa: E402

mesh_lib.configure_virtual_devices(8)

from headrace.pipelines import ctr  # noqa: E402
from headrace.pipelines.ctr_data import generate  # noqa: E402
from headrace.runners.beam_runner import run_pipeline  # noqa: E402
from headrace.runners.train_ctr import CTRTrainConfig, train_and_evaluate  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=4_000_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batches", default="1024,8192,65536")
    parser.add_argument("--mesh", default="batch=1")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-cowclip-"))
    rows = []
    try:
        log = generate(root / "log.tsv", args.lines, seed=0)
        data = str(root / "shards")
        run_pipeline(ctr.build_ctr_ingest, ctr.CtrIngestConfig(input=log.path, output=data, shards=8))
        n_train = json.loads((Path(data) / "report.json").read_text())["train"]
        for batch in (int(b) for b in args.batches.split(",")):
            for optimizer in ("adam", "cowclip"):
                out = root / f"{optimizer}-{batch}"
                m = train_and_evaluate(
                    CTRTrainConfig(
                        data=data, output=str(out), model="deepfm", batch_size=batch, epochs=args.epochs,
                        optimizer=optimizer, mesh=args.mesh, capacity=1 << 19, min_count=2, export=False,
                        log_every_seconds=60,
                    )
                )  # fmt: skip
                rows.append((batch, optimizer, m["auc"], m["logloss"], m["seconds_per_epoch"], m["steps"]))
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = {opt: next(r for r in rows if r[0] == rows[0][0] and r[1] == opt) for opt in ("adam", "cowclip")}
    print(
        f"\nDeepFM, {n_train:,} train examples, {args.epochs} epochs, mesh {args.mesh} (cores: {os.cpu_count()})"
    )
    print(
        f"{'batch':>7} {'optimizer':<9} {'AUC':>8} {'vs 1K adam':>11} {'logloss':>8} {'s/epoch':>8} {'speed-up':>9} {'steps':>6}"
    )
    for batch, opt, a, ll, s, steps in rows:
        delta = (a - base["adam"][2]) / base["adam"][2] * 100
        print(
            f"{batch:>7} {opt:<9} {a:>8.4f} {delta:>+10.2f}% {ll:>8.4f} {s:>8.1f} {base[opt][4] / s:>8.1f}x {steps:>6}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
