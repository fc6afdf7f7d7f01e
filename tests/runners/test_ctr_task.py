"""The CTR task's step: sharded training equal to unsharded training, for every model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from headrace.core import mesh as mesh_lib
from headrace.models.ctr import MODELS
from headrace.runners import loop
from headrace.runners.ctr_task import CTRTask, CTRTrainConfig


def _losses(config: CTRTrainConfig, directory, steps: int) -> tuple[list, np.ndarray]:
    task = CTRTask(config)
    losses = loop.Fit(task, directory, "", resume=False).run().history["loss"]
    assert len(losses) == steps
    return losses, mesh_lib.to_numpy(task.sparse.E)


@pytest.mark.parametrize("name", MODELS)
def test_sharded_training_equals_unsharded(name, ctr_shards, tmp_path):
    config = CTRTrainConfig(
        data=str(ctr_shards),
        model=name,
        batch_size=128,
        steps=3,
        embedding_dim=8,
        hidden=(32, 16),
        cross_layers=2,
        capacity=1 << 14,
        min_count=2,
        optimizer="cowclip",
        learning_rate=0.01,
        embedding_learning_rate=0.01,
    )
    ref_losses, ref_E = _losses(dataclasses.replace(config, mesh=""), tmp_path / "one", 3)
    losses, E = _losses(dataclasses.replace(config, mesh="batch=4,model=2"), tmp_path / "mesh", 3)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    np.testing.assert_allclose(E, ref_E, rtol=0, atol=1e-5)
    assert ref_losses[0] > 0.3 and not np.allclose(ref_E, 0)
