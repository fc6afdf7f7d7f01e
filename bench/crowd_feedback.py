"""Benchmark: crowd-classifier predictions fed back as EM task priors, out-of-fold vs in-sample.

    python bench/crowd_feedback.py [--tasks 1200] [--folds 5]

Prints the Dawid-Skene labels' accuracy against the truth without priors, with the classifier's
out-of-fold predictions as priors (`--folds K`, the default), and with in-sample ones (`--folds 0`, which
count each task's annotations twice: the model learned the very posterior it then feeds back).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=1200)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from headrace.core import mesh

    mesh.configure_virtual_devices(8)
    from headrace.models.text_classifier import TextClassifierConfig
    from headrace.pipelines.crowd import CrowdConfig, build_crowd_labels
    from headrace.pipelines.crowd_data import generate
    from headrace.runners.beam_runner import run_pipeline
    from headrace.runners.train_crowd_classifier import CrowdClassifierConfig, train_and_evaluate

    root = Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    try:
        data = generate(
            root / "data", num_tasks=args.tasks, num_workers=args.tasks // 4, labels_per_task=5, seed=5
        )
        common = dict(
            annotations=data.annotations,
            tasks=data.tasks,
            truth=data.truth,
            method="dawid_skene",
            iterations=20,
        )

        def accuracy(out: Path) -> float:
            return json.loads((out / "report.json").read_text())["truth"]["accuracy"]

        run_pipeline(build_crowd_labels, CrowdConfig(output=str(root / "labels"), **common))
        rows = [("no priors", accuracy(root / "labels"))]
        for folds, name in (
            (args.folds, f"out-of-fold priors ({args.folds} folds)"),
            (0, "in-sample priors"),
        ):
            model = root / f"model-{folds}"
            config = CrowdClassifierConfig(
                data=str(root / "labels"),
                output=str(model),
                batch_size=32,
                epochs=6,
                folds=folds,
                model=TextClassifierConfig(buckets=4096, embed_dim=16, hidden=16),
            )
            train_and_evaluate(config)
            out = root / f"labels-{folds}"
            priors = str(model / "predictions.csv")
            run_pipeline(build_crowd_labels, CrowdConfig(output=str(out), task_priors=priors, **common))
            rows.append((name, accuracy(out)))
        print(f"Dawid-Skene labels vs truth, {args.tasks} tasks, 5 labels each")
        print(f"{'priors':<34} {'accuracy':>9} {'gain':>7}")
        for name, acc in rows:
            print(f"{name:<34} {acc:>9.4f} {acc - rows[0][1]:>+7.4f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
