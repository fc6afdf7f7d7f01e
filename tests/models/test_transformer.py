"""The Transformer: talking heads vs multi-head, sharded vs unsharded, packing, the decoding cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

from headrace.core import mesh as mesh_lib
from headrace.core.errors import ConfigError
from headrace.models.transformer import Transformer, TransformerConfig

U = dtensor.UNSHARDED
SMALL = TransformerConfig(
    vocab_size=64, d_model=32, heads=4, head_dim=8, layers=2, ffn=48, max_len=32, seed=3
)


def _packed(batch=8, length=16, seed=0):
    """Rows of 2-3 documents each, then padding (segment 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, SMALL.vocab_size, size=(batch, length))
    segments = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = sorted(rng.choice(np.arange(2, length - 2), size=2, replace=False))
        used = length - rng.integers(0, 3)
        for s, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, used]), start=1):
            segments[b, lo:hi] = s
            positions[b, lo:hi] = np.arange(hi - lo)
    tokens[segments == 0] = 0
    return tokens.astype(np.int32), segments, positions


def test_talking_heads_with_identity_projections_is_multi_head_attention():
    talking = Transformer(dataclasses.replace(SMALL, attention="talking_heads"))
    plain = Transformer(dataclasses.replace(SMALL, attention="multi_head"))
    for tb, pb in zip(talking.blocks, plain.blocks):
        for key in pb:
            tb[key].assign(pb[key])
        tb["p_logits"].assign(tf.eye(SMALL.heads))
        tb["p_weights"].assign(tf.eye(SMALL.heads))
    for name in ("embedding", "final_norm", "unembed"):
        getattr(talking, name).assign(getattr(plain, name))
    inputs = _packed()
    np.testing.assert_allclose(talking(*inputs).numpy(), plain(*inputs).numpy(), rtol=0, atol=1e-6)
    # ... and the projections change it when they are not the identity.
    talking.blocks[0]["p_logits"].assign(tf.eye(SMALL.heads)[::-1])
    assert np.abs(talking(*inputs).numpy() - plain(*inputs).numpy()).max() > 1e-3


def test_a_token_never_attends_across_a_packed_document():
    model = Transformer(SMALL)
    tokens, segments, positions = _packed(seed=1)
    before = model(tokens, segments, positions).numpy()
    changed = tokens.copy()
    row = 0
    first = segments[row] == 1
    changed[row, first] = (changed[row, first] + 7) % SMALL.vocab_size  # rewrite document 1 of row 0
    after = model(changed, segments, positions).numpy()
    others = segments[row] > 1
    np.testing.assert_allclose(after[row, others], before[row, others], rtol=0, atol=1e-6)
    np.testing.assert_allclose(after[1:], before[1:], rtol=0, atol=1e-6)
    assert np.abs(after[row, first] - before[row, first]).max() > 1e-3


@pytest.mark.parametrize("variant", [{}, {"positions": "learned", "norm": "layer", "activation": "gelu"}])
def test_decoding_with_the_cache_equals_the_full_forward_pass(variant):
    model = Transformer(dataclasses.replace(SMALL, **variant))
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, SMALL.vocab_size, size=(3, 10)).astype(np.int32)
    full = model(tokens, np.ones_like(tokens), np.tile(np.arange(10), (3, 1))).numpy()
    cache = model.init_cache(3, 12)
    for i in range(10):
        logits, cache = model.decode(tokens[:, i], i, cache)
        np.testing.assert_allclose(logits.numpy(), full[:, i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", [{}, {"positions": "learned", "norm": "layer", "activation": "gelu"}])
def test_prefill_equals_decoding_the_prompt_a_token_at_a_time(variant):
    model = Transformer(dataclasses.replace(SMALL, **variant))
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, SMALL.vocab_size, size=(2, 7)).astype(np.int32)
    padded = np.concatenate([tokens, rng.integers(1, SMALL.vocab_size, size=(2, 5))], axis=1)  # to 12
    logits, filled = model.prefill(padded)
    cache = model.init_cache(2, 12)
    for i in range(7):
        step_logits, cache = model.decode(tokens[:, i], i, cache)
        np.testing.assert_allclose(logits[:, i].numpy(), step_logits.numpy(), rtol=0, atol=1e-5)
    for ours, theirs in zip(filled, cache):  # the prompt's keys and values; the padding's are never read
        for name in ("k", "v"):
            np.testing.assert_allclose(
                ours[name][:, :, :7].numpy(), theirs[name][:, :, :7].numpy(), atol=1e-5
            )
    # Decoding on from the prefilled cache gives what decoding on from the stepped one gives.
    nxt = rng.integers(1, SMALL.vocab_size, size=2)
    a, _ = model.decode(nxt, 7, filled)
    b, _ = model.decode(nxt, 7, cache)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5)


def _grads(model, inputs, place):
    @tf.function  # as the training loop runs it (DTensor places the step's constants on the mesh)
    def step(*placed):
        with tf.GradientTape() as tape:
            loss = model.loss(*placed)
        return loss, [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.weights)]

    loss, grads = step(*[place(x) for x in inputs])
    return mesh_lib.to_numpy(loss), [mesh_lib.to_numpy(g) for g in grads]


@pytest.mark.parametrize(
    "variant",
    [
        {"attention": "multi_head"},
        {"attention": "talking_heads"},
        {"attention": "talking_heads", "positions": "learned", "norm": "layer", "activation": "gelu"},
    ],
)
def test_sharded_loss_and_every_gradient_equal_unsharded(variant):
    config = dataclasses.replace(SMALL, **variant)
    inputs = _packed(seed=4)
    ref_loss, ref_grads = _grads(Transformer(config), inputs, tf.convert_to_tensor)
    mesh = mesh_lib.create_mesh("batch=4,model=2")
    loss, grads = _grads(Transformer(config, mesh), inputs, lambda x: mesh_lib.shard_batch(mesh, x))
    assert ref_loss > 1.0  # about log(64) before training
    np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1e-5)
    assert len(grads) == len(ref_grads)
    for g, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-5)


def test_every_weight_has_its_declared_layout():
    mesh = mesh_lib.create_mesh("batch=4,model=2")
    model = Transformer(SMALL, mesh)
    specs = lambda v: dtensor.fetch_layout(v).sharding_specs
    assert specs(model.embedding) == [U, "model"] and specs(model.unembed) == [U, "model"]
    assert specs(model.final_norm) == [U]
    block = model.blocks[0]
    for key in ("wq", "wk", "wv"):
        assert specs(block[key]) == [U, "model", U], key  # heads over model
    assert specs(block["wo"]) == ["model", U, U]
    assert specs(block["w_in"]) == [U, "model"] and specs(block["w_gate"]) == [U, "model"]
    assert specs(block["w_out"]) == ["model", U]
    assert specs(block["p_logits"]) == [U, U] and specs(block["p_weights"]) == [U, U]


def test_a_head_count_that_does_not_divide_model_is_refused():
    mesh = mesh_lib.create_mesh("batch=4,model=2")
    with pytest.raises(ConfigError, match="--heads 3 does not divide the mesh's model dimension"):
        Transformer(dataclasses.replace(SMALL, heads=3), mesh)
    with pytest.raises(ConfigError, match="--attention 'sparse'"):
        Transformer(dataclasses.replace(SMALL, attention="sparse"))
