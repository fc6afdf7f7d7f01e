"""The text classifier: preprocessing in eager mode and in tf.data, layouts, sharded == unsharded."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

from headrace.core import mesh as mesh_lib
from headrace.models.optim import Adam
from headrace.models.text_classifier import TextClassifier, TextClassifierConfig, text_to_ids

CONFIG = TextClassifierConfig(num_classes=3, buckets=512, embed_dim=8, hidden=8, max_tokens=12, seed=2)
TEXTS = ["The cat sat.", "DOGS bark, loudly!", "", "cat cat dog", "x" * 3, "a b c d e f g h i j k l m n"]


def test_preprocessing_is_the_same_eagerly_and_in_tf_data():
    eager = text_to_ids(tf.constant(TEXTS), CONFIG.buckets, CONFIG.max_tokens).numpy()
    ds = (
        tf.data.Dataset.from_tensor_slices(TEXTS)
        .batch(2)
        .map(lambda t: text_to_ids(t, CONFIG.buckets, CONFIG.max_tokens))
    )
    in_data = np.concatenate([b.numpy() for b in ds])
    np.testing.assert_array_equal(eager, in_data)
    assert eager.shape == (6, 12)
    # "the cat sat": 3 unigrams + 2 bigrams; punctuation and case do not matter.
    assert (eager[0] >= 0).sum() == 5
    assert (eager[2] == -1).all()
    np.testing.assert_array_equal(text_to_ids(tf.constant(["the CAT, sat"]), CONFIG.buckets, 12), eager[:1])
    assert (eager[5] >= 0).sum() == 12  # truncated to max_tokens


def test_layouts_of_every_weight():
    mesh = mesh_lib.create_mesh("batch=4,model=2")
    model = TextClassifier(CONFIG, mesh)
    U = dtensor.UNSHARDED
    expected = {"embedding": [U, "model"], "w1": ["model", U], "b1": [U], "w2": [U, U], "b2": [U]}
    for name, specs in expected.items():
        assert dtensor.fetch_layout(getattr(model, name)).sharding_specs == specs, name


@pytest.mark.parametrize("spec", ["batch=4,model=2", "model=8"])
def test_sharded_training_equals_unsharded(spec):
    rng = np.random.default_rng(0)
    ids = text_to_ids(
        tf.constant([TEXTS[i % 6] + f" w{i}" for i in range(16)]), CONFIG.buckets, CONFIG.max_tokens
    )
    soft = rng.dirichlet(np.ones(3), size=16).astype(np.float32)

    def train(model, shard):
        opt = Adam(model.weights, learning_rate=0.1)

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = model.loss(x, y)
            opt.apply(tape.gradient(loss, model.weights), model.weights)
            return loss

        losses = [float(mesh_lib.to_numpy(step(shard(ids), shard(soft)))) for _ in range(3)]
        return losses, [mesh_lib.to_numpy(w) for w in model.weights]

    ref_losses, ref_weights = train(TextClassifier(CONFIG), tf.convert_to_tensor)
    mesh = mesh_lib.create_mesh(spec)
    losses, weights = train(TextClassifier(CONFIG, mesh), lambda v: mesh_lib.shard_batch(mesh, v))
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    for a, b in zip(weights, ref_weights):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert ref_losses[-1] < ref_losses[0]
