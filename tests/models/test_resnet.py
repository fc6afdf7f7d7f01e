"""ResNet v1.5 with grouped batch norm on the 8-device CPU mesh, against the unsharded model and numpy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

from headrace.core import mesh as mesh_lib
from headrace.core.errors import ConfigError
from headrace.models.resnet import ResNet, ResNetConfig, resnet_mesh

# float64: in float32 the sharded step's sums, ordered otherwise, move a few activations across a ReLU's
# kink (about one in 10^5 lies within float32 noise of zero), and each such flip moves its gradients by a
# percent; in float64 none does, and the steps agree to 1e-10. zero_init_residual off: every branch counts.
SMALL = ResNetConfig(depth=18, num_classes=5, width=4, seed=1, zero_init_residual=False, dtype="float64")
BATCH = 32


def _inputs(seed=0, size=64):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(BATCH, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, SMALL.num_classes, size=BATCH).astype(np.int32)
    return images, labels


def _step(model, images, labels):
    placed = model.place(images, labels)

    @tf.function
    def step(images, onehot, labels):
        stats = []
        with tf.GradientTape() as tape:
            loss, _ = model.loss(images, onehot, labels, label_smoothing=0.1, stats=stats)
        grads = tape.gradient(loss, model.weights)
        return loss, [tf.convert_to_tensor(g) for g in grads], [(m, v) for _, m, v in stats]

    loss, grads, stats = step(*placed)
    return (
        mesh_lib.to_numpy(loss),
        [mesh_lib.to_numpy(g) for g in grads],
        [(mesh_lib.to_numpy(m), mesh_lib.to_numpy(v)) for m, v in stats],
    )


def _assert_same(a, b, atol=1e-8):
    loss, grads, stats = a
    ref_loss, ref_grads, ref_stats = b
    np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=atol)
    assert len(grads) == len(ref_grads) and len(stats) == len(ref_stats)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=atol)
    for (m, v), (rm, rv) in zip(stats, ref_stats):
        np.testing.assert_allclose(m, rm, rtol=1e-6, atol=atol)
        np.testing.assert_allclose(v, rv, rtol=1e-6, atol=atol)


def _sharded(group_size: int) -> ResNet:
    mesh, groups = resnet_mesh(8, group_size)
    return ResNet(SMALL, mesh, bn_groups=groups)


def test_group_of_all_replicas_is_one_unsharded_step_on_the_global_batch():
    images, labels = _inputs()
    sharded = _step(_sharded(8), images, labels)
    whole = _step(ResNet(SMALL), images, labels)
    _assert_same(sharded, whole)
    assert sharded[2][0][0].shape == (1, SMALL.width)  # one group: the global batch's statistics
    assert whole[0] > 1.0


def test_group_of_one_replica_is_per_replica_batch_norm():
    images, labels = _inputs(seed=1)
    sharded = _step(_sharded(1), images, labels)
    _assert_same(sharded, _step(ResNet(SMALL, bn_groups=8), images, labels))
    global_ = _step(ResNet(SMALL), images, labels)
    assert abs(sharded[0] - global_[0]) > 1e-4  # per-replica statistics change the step


@pytest.mark.parametrize("group_size", [2, 4])
def test_grouped_statistics_are_each_groups_own_checked_against_numpy(group_size):
    images, labels = _inputs(seed=2)
    model = _sharded(group_size)
    assert model.bn_groups == 8 // group_size
    loss, grads, stats = _step(model, images, labels)
    # The stem's statistics, by hand: its convolution on the host, then the mean and variance of each
    # consecutive run of BATCH / groups examples (the examples of `group_size` replicas).
    reference = ResNet(SMALL)
    conv = reference._conv(tf.constant(images, tf.float64), reference.stem["conv"], 2).numpy()
    groups = 8 // group_size
    per = conv.reshape(groups, BATCH // groups, *conv.shape[1:])
    mean, var = stats[0]
    assert mean.shape == (groups, SMALL.width)
    np.testing.assert_allclose(mean, per.mean(axis=(1, 2, 3)), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(var, per.var(axis=(1, 2, 3)), rtol=1e-9, atol=1e-10)
    _assert_same((loss, grads, stats), _step(ResNet(SMALL, bn_groups=groups), images, labels))


def test_every_weight_is_replicated_and_every_activation_split_over_the_batch():
    model = _sharded(2)
    for w in model.weights + [layer[k] for layer in model.batch_norms for k in ("mean", "variance")]:
        assert dtensor.fetch_layout(w).is_fully_replicated(), w.name
    images, onehot = model.place(_inputs()[0])
    assert dtensor.fetch_layout(images).sharding_specs == ["batch", "unsharded", "unsharded", "unsharded"]

    @tf.function
    def forward(images, onehot):
        stem = model._conv(tf.cast(images, tf.float64), model.stem["conv"], 2)
        stats = []
        return stem, model(images, onehot, stats), stats[0][1]

    stem, logits, mean = forward(images, onehot)
    # Batch-parallel all the way: no activation is gathered onto every replica.
    assert dtensor.fetch_layout(stem).sharding_specs == ["batch", "unsharded", "unsharded", "unsharded"]
    assert dtensor.fetch_layout(logits).sharding_specs == ["batch", "unsharded"]
    assert logits.shape == (BATCH, SMALL.num_classes)
    assert dtensor.fetch_layout(mean).is_fully_replicated() and mean.shape == (4, SMALL.width)


def test_moving_statistics_follow_the_groups_average():
    mesh, groups = resnet_mesh(8, 2)
    model = ResNet(dataclasses.replace(SMALL, bn_momentum=0.5), mesh, bn_groups=groups)
    placed = model.place(*_inputs(seed=3))

    @tf.function
    def step(images, onehot, labels):
        stats = []
        model.loss(images, onehot, labels, stats=stats)
        model.update_moving_statistics(stats)
        return stats[0][1]

    mean = mesh_lib.to_numpy(step(*placed))
    moving = mesh_lib.to_numpy(model.batch_norms[0]["mean"])
    np.testing.assert_allclose(moving, 0.5 * mean.mean(axis=0), rtol=1e-9, atol=1e-12)


def test_depths_have_the_published_sizes():
    for depth, params in ((18, 11_689_512), (50, 25_557_032)):  # torchvision's counts, 1000 classes
        model = ResNet(ResNetConfig(depth=depth))
        assert sum(int(np.prod(w.shape)) for w in model.weights) == params, depth


def test_a_group_size_that_does_not_divide_the_replicas_is_refused():
    with pytest.raises(ConfigError, match="--bn-group-size 3 does not divide the 8 replicas"):
        resnet_mesh(8, 3)
    with pytest.raises(ConfigError, match="--depth 20"):
        ResNet(ResNetConfig(depth=20))
