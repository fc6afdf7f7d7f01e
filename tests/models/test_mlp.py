"""The example MLP: its layouts, and sharded training steps equal to unsharded ones."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

from headrace.core import mesh as mesh_lib
from headrace.models.mlp import MLP, MLPConfig
from headrace.models.optim import Adam

U = dtensor.UNSHARDED
CONFIG = MLPConfig(num_dense=4, vocab_size=20, embed_dim=8, hidden=16, seed=1)


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(-1, CONFIG.vocab_size, size=(n, 5))
    return {
        "dense": rng.normal(size=(n, 4)).astype(np.float32),
        "tokens": tokens.astype(np.int64),
        "label": rng.integers(0, 2, size=n).astype(np.int64),
    }


def test_every_weight_has_its_declared_layout():
    mesh = mesh_lib.create_mesh("batch=4,model=2")
    model = MLP(CONFIG, mesh)
    expected = {
        "embedding": [U, "model"],
        "w1": [U, "model"],
        "b1": ["model"],
        "w2": ["model", U],
        "b2": [U],
    }
    for name, specs in expected.items():
        assert dtensor.fetch_layout(getattr(model, name)).sharding_specs == specs, name


def _train(model, batches, shard):
    variables = [model.embedding, model.w1, model.b1, model.w2, model.b2]
    optimizer = Adam(variables, learning_rate=0.05)

    @tf.function
    def step(batch):
        with tf.GradientTape() as tape:
            loss = model.loss(batch)
        grads = tape.gradient(loss, variables)
        grads = [tf.convert_to_tensor(g) for g in grads]
        optimizer.apply(grads, variables)
        return loss, grads

    history = []
    for batch in batches:
        loss, grads = step({k: shard(v) for k, v in batch.items()})
        history.append((mesh_lib.to_numpy(loss), [mesh_lib.to_numpy(g) for g in grads]))
    return history, [mesh_lib.to_numpy(v) for v in variables]


@pytest.mark.parametrize("spec", ["batch=4,model=2", "batch=8", "model=8"])
def test_sharded_steps_equal_unsharded_loss_gradients_and_weights(spec):
    batches = [_batch(seed=s) for s in range(3)]
    ref_history, ref_weights = _train(MLP(CONFIG), batches, tf.convert_to_tensor)
    mesh = mesh_lib.create_mesh(spec)
    history, weights = _train(MLP(CONFIG, mesh), batches, lambda v: mesh_lib.shard_batch(mesh, v))
    for (ref_loss, ref_grads), (loss, grads) in zip(ref_history, history):
        np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1e-5)
        for g_ref, g in zip(ref_grads, grads):
            np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-5)
    for w_ref, w in zip(ref_weights, weights):
        np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-5)
    assert ref_history[0][0] > 0.1  # a real loss, not a degenerate zero
