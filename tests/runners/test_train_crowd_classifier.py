"""crowd-classifier: learned from the posteriors, evaluated on held-out tasks, fed back as EM priors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from headrace.core.errors import InputError
from headrace.models.text_classifier import TextClassifierConfig
from headrace.pipelines.crowd import CrowdConfig, build_crowd_labels
from headrace.pipelines.crowd_data import generate
from headrace.runners.beam_runner import run_pipeline
from headrace.runners.train_crowd_classifier import CrowdClassifierConfig, train_and_evaluate


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    root = tmp_path_factory.mktemp("crowd-cls")
    data = generate(root / "data", num_tasks=1200, num_workers=300, labels_per_task=5, seed=5)
    common = dict(
        annotations=data.annotations, tasks=data.tasks, truth=data.truth, method="dawid_skene", iterations=20
    )
    run_pipeline(build_crowd_labels, CrowdConfig(output=str(root / "labels"), **common))
    return data, root, common


def test_classifier_learns_from_soft_labels_and_feeds_back(crowd):
    _, root, common = crowd
    out = root / "model"
    config = CrowdClassifierConfig(
        data=str(root / "labels"),
        output=str(out),
        batch_size=32,
        epochs=6,
        model=TextClassifierConfig(buckets=4096, embed_dim=16, hidden=16),
    )
    m = train_and_evaluate(config)
    assert m["eval_tasks"] > 100 and m["train_tasks"] + m["eval_tasks"] == 1200
    assert m["loss_last"] < m["loss_first"]
    # The texts carry the class: the classifier beats the noisy aggregate it learned from.
    assert m["accuracy_vs_truth"] > 0.8
    assert m["accuracy_vs_truth"] > m["aggregated_accuracy_vs_truth"]
    for name in ("metrics.json", "curves.png", "predictions.csv", "resolved_config.json"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").glob("events.*"))
    predictions = pd.read_csv(out / "predictions.csv", dtype={"task": str})
    assert list(predictions.columns) == ["task", "c0", "c1", "c2"] and len(predictions) == 1200
    # The train tasks' predictions come from fold models that never saw those tasks (their posteriors
    # come from the same annotations the EM will count again).
    assert m["train_predictions"] == "out-of-fold (5 folds)"
    for f in range(5):
        assert list((out / "tensorboard" / f"fold{f}").glob("events.*"))

    # Feedback: the classifier's out-of-fold predictions as per-task priors make the EM's labels more
    # accurate.
    before = json.loads((root / "labels" / "report.json").read_text())["truth"]["accuracy"]
    run_pipeline(
        build_crowd_labels,
        CrowdConfig(output=str(root / "labels2"), task_priors=str(out / "predictions.csv"), **common),
    )
    report = json.loads((root / "labels2" / "report.json").read_text())
    assert report["task_priors_file"] == {"read": 1200, "used": 1200, "rejected": 0}
    assert report["truth"]["accuracy"] > before + 0.02


def test_classifier_needs_task_shards(tmp_path, crowd):
    data, _, _ = crowd
    run_pipeline(
        build_crowd_labels, CrowdConfig(output=str(tmp_path / "no-text"), annotations=data.annotations)
    )
    with pytest.raises(InputError, match="run crowd-labels with --tasks"):
        train_and_evaluate(CrowdClassifierConfig(data=str(tmp_path / "no-text"), output=str(tmp_path / "m")))
