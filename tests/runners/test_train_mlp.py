"""The example trainer on a shrunk config: it learns, and writes metrics, curves, summaries, checkpoint."""

from __future__ import annotations

import json

from headrace.models.mlp import MLPConfig
from headrace.runners.train_mlp import MLPTrainConfig, train_and_evaluate


def test_mlp_trains_on_the_example_shards(example_output, tmp_path):
    out = tmp_path / "mlp"
    config = MLPTrainConfig(
        data=str(example_output),
        output=str(out),
        mesh="batch=4,model=2",
        batch_size=64,
        steps=150,
        learning_rate=0.02,
        model=MLPConfig(hidden=16, embed_dim=4),
    )
    result = train_and_evaluate(config)
    assert result["steps"] == 150
    assert result["loss_last"] < result["loss_first"] - 0.1
    assert result["auc"] > 0.75  # the planted model's own AUC is about 0.86
    assert json.loads((out / "metrics.json").read_text())["auc"] == result["auc"]
    assert (out / "curves.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert list((out / "checkpoint").glob("ckpt*.index"))
    assert json.loads((out / "resolved_config.json").read_text())["model"]["hidden"] == 16
