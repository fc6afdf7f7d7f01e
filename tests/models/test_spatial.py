"""Spatially partitioned ops equal their whole-volume counterparts, values and gradients, on 8 CPU devices."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from headrace.core.errors import ConfigError
from headrace.models import spatial
from headrace.models.spatial import Partition
from headrace.models.unet3d import UNet3D


def _devices(n: int) -> list[str]:
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(devices) >= n, "tests/conftest.py configures 8 virtual CPU devices"
    return devices


def _close(got, want, tol=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    scale = max(np.abs(want).max(), 1e-12)
    assert np.abs(got - want).max() <= tol * scale, np.abs(got - want).max() / scale


@pytest.mark.parametrize(
    "depth,parts,kernel",
    [
        (12, 2, 3),  # blocks of 6 > halo 1
        (12, 4, 5),  # blocks of 3 > halo 2
        (6, 4, 5),  # blocks of 2, 2, 1, 1: thinner than the halo of 2, taken from two neighbours
        (4, 4, 5),  # blocks of 1 slice, halo 2
        (8, 2, 5),
        (5, 4, 3),
    ],
)
def test_partitioned_conv_equals_whole_conv_with_gradients(depth, parts, kernel):
    rng = np.random.default_rng(depth * 10 + parts + kernel)
    x = tf.constant(rng.normal(size=(2, depth, 7, 6, 3)), tf.float32)
    w = tf.Variable(rng.normal(size=(kernel, kernel, kernel, 3, 4)), dtype=tf.float32)
    b = tf.Variable(rng.normal(size=(4,)), dtype=tf.float32)
    cotangent = tf.constant(rng.normal(size=(2, depth, 7, 6, 4)), tf.float32)
    part = Partition.even(depth, parts, _devices(parts))
    assert len(part.sizes) == parts and sum(part.sizes) == depth

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        whole = tf.nn.conv3d(x, w, [1, 1, 1, 1, 1], "SAME") + b
        split = spatial.gather(spatial.conv3d(spatial.scatter(x, part), w, b, part))
        loss_whole = tf.reduce_sum(whole * cotangent)
        loss_split = tf.reduce_sum(split * cotangent)
    _close(split, whole)
    for target in (x, w, b):
        _close(tape.gradient(loss_split, target), tape.gradient(loss_whole, target))


def test_norm_pool_upsample_and_losses_equal_whole_volume():
    rng = np.random.default_rng(0)
    devices = _devices(4)
    x = tf.constant(rng.normal(size=(2, 8, 6, 4, 3)) + 3.0, tf.float32)
    whole, part = Partition.even(8, 1, devices), Partition.even(8, 4, devices, multiple=2)
    gamma, beta = tf.constant(rng.normal(size=3), tf.float32), tf.constant(rng.normal(size=3), tf.float32)
    for p in (whole, part):
        blocks = spatial.scatter(x, p)
        normed = spatial.gather(spatial.instance_norm(blocks, gamma, beta, p))
        mean, var = tf.nn.moments(x, axes=[1, 2, 3], keepdims=True)
        _close(normed, (x - mean) / tf.sqrt(var + 1e-5) * gamma + beta, 1e-4)
        _close(spatial.gather(spatial.max_pool(blocks, p)), tf.nn.max_pool3d(x, 2, 2, "VALID"))
    up_w = tf.constant(rng.normal(size=(2, 2, 2, 5, 3)), tf.float32)
    up_b = tf.zeros([5])
    want = tf.nn.conv3d_transpose(x, up_w, [2, 16, 12, 8, 5], [1, 2, 2, 2, 1], "VALID")
    _close(spatial.gather(spatial.upsample(spatial.scatter(x, part), up_w, up_b, part)), want)
    logits = tf.constant(rng.normal(size=(2, 8, 6, 4, 2)), tf.float32)
    labels = tf.constant(rng.integers(0, 2, size=(2, 8, 6, 4)), tf.int32)
    ce = [
        spatial.cross_entropy(spatial.scatter(logits, p), spatial.scatter(labels, p), p)
        for p in (whole, part)
    ]
    dice = [
        spatial.soft_dice(spatial.scatter(logits, p), spatial.scatter(labels, p), p) for p in (whole, part)
    ]
    _close(ce[1], ce[0])
    _close(dice[1], dice[0])


def test_partition_refuses_what_pooling_cannot_split():
    devices = _devices(8)
    assert Partition.even(40, 4, devices, multiple=4).sizes == (12, 12, 8, 8)  # unequal blocks, all /4
    four_on_two = Partition.even(32, 2, devices, multiple=4, slabs=4)
    assert (
        four_on_two.sizes == (8, 8, 8, 8) and four_on_two.block_sizes == (16, 16) and four_on_two.parts == 2
    )
    with pytest.raises(ConfigError, match="needs a depth of at least 32"):
        Partition.even(16, 8, devices, multiple=4)
    with pytest.raises(ConfigError, match="not a multiple of 4"):
        Partition.even(18, 2, devices, multiple=4)


@pytest.mark.parametrize("slabs", [None, 4])
def test_unet_loss_and_gradients_agree_between_1_and_4_partitions_after_two_steps(slabs):
    """slabs=None: P=1 computes the volume whole, P=4 in four blocks (float32 summation order differs);
    slabs=4: both compute four slabs, P=1 on one device, and must agree to float noise of the runtime."""
    from headrace.models.optim import Adam

    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(1, 16, 12, 12, 1)), tf.float32)
    y = tf.constant((rng.uniform(size=(1, 16, 12, 12)) < 0.2).astype(np.int32))
    devices = _devices(4)
    results = {}
    for parts in (1, 4):
        model = UNet3D(channels=4, levels=3, seed=3)
        opt = Adam(model.weights, learning_rate=1e-2)
        part = Partition.even(16, parts, devices, multiple=model.multiple, slabs=slabs)
        losses, grads = [], None
        for _ in range(3):
            with tf.GradientTape() as tape:
                loss, _ = model.loss(spatial.scatter(x, part), spatial.scatter(y, part), part)
            grads = tape.gradient(loss, model.weights)
            losses.append(float(loss))
            if len(losses) < 3:  # two steps, then the third loss and gradients are compared
                opt.apply(grads, model.weights)
        results[parts] = (losses, [g.numpy() for g in grads])
    np.testing.assert_allclose(results[4][0], results[1][0], rtol=1e-4 if slabs is None else 1e-6)
    assert results[1][0][2] < results[1][0][0]  # it trains
    # Against the largest gradient entry of the model: 1e-4. Per variable, the gradient of a norm's gain
    # sums terms that cancel (normalised activations sum to zero), so its own scale is looser: 2e-3.
    largest = max(np.abs(g).max() for g in results[1][1])
    for g4, g1 in zip(results[4][1], results[1][1]):
        assert np.abs(g4 - g1).max() <= 1e-4 * largest
        _close(g4, g1, 2e-3)
