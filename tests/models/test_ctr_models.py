"""CTR models: the layout of every weight, dense and sparse."""

from __future__ import annotations

import pytest
from tensorflow.experimental import dtensor

from headrace.core import mesh as mesh_lib
from headrace.models.ctr import MODELS, CTRModel, CTRModelConfig
from headrace.models.sparse import SparseEmbeddings

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
