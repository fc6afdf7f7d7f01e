"""CTR models: the layout of every weight, and sharded training equal to unsharded training."""

from __future__ import annotations

import numpy as np
import pytest
from tensorflow.experimental import dtensor

from headrace.models.ctr import MODELS, CTRModel, CTRModelConfig
from headrace.runners import mesh as mesh_lib
from headrace.runners.train_ctr import CTRTrainConfig, CTRTrainer, SparseEmbeddings

U = dtensor.UNSHARDED


@pytest.mark.parametrize("name", MODELS)
def test_every_weight_has_its_declared_layout(name):
    mesh = mesh_lib.create_mesh("batch=4,model=2")
    config = CTRModelConfig(name=name, num_fields=39, embedding_dim=4, hidden=(16, 8, 4), cross_layers=2)
    model = CTRModel(config, mesh)
    expected = {"bias": [U]}
    if name in ("wide_deep", "deepfm", "dcn", "dcn_v2"):
        expected.update(
            mlp_w0=[U, "model"],
            mlp_b0=["model"],
            mlp_w1=["model", U],
            mlp_b1=[U],
            mlp_w2=[U, "model"],
            mlp_b2=["model"],
        )
        expected["out"] = [U, U]
    if name == "dcn":
        expected.update(cross_w0=[U], cross_b0=[U], cross_w1=[U], cross_b1=[U])
    if name == "dcn_v2":
        expected.update(cross_w0=[U, "model"], cross_b0=["model"], cross_w1=[U, "model"], cross_b1=["model"])
    names = {v.name.split(":")[0]: v for v in model.weights}
    assert set(names) == set(expected)
    for key, specs in expected.items():
        assert dtensor.fetch_layout(names[key]).sharding_specs == specs, key
    sparse = SparseEmbeddings(64, 4, mesh)
    assert dtensor.fetch_layout(sparse.E).sharding_specs == [U, "model"]
    assert dtensor.fetch_layout(sparse.w).sharding_specs == [U, U]


def _losses(config: CTRTrainConfig, mesh, steps: int) -> tuple[list, np.ndarray]:
    trainer = CTRTrainer(config, mesh)
    losses = trainer.fit(steps_per_epoch=1000)
    assert len(losses) == steps
    return losses, mesh_lib.to_numpy(trainer.sparse.E)


@pytest.mark.parametrize("name", MODELS)
def test_sharded_training_equals_unsharded(name, ctr_shards):
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
    ref_losses, ref_E = _losses(config, None, 3)
    losses, E = _losses(config, mesh_lib.create_mesh("batch=4,model=2"), 3)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    np.testing.assert_allclose(E, ref_E, rtol=0, atol=1e-5)
    assert ref_losses[0] > 0.3 and not np.allclose(ref_E, 0)
