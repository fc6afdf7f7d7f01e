"""ResNet v1.5 as a tf.Module of plain variables or DVariables, with batch norm reduced over groups of
replicas (Ying et al. 2018, "Image Classification at Supercomputer Scale").

The batch [B, H, W, C] is split over the mesh's ``batch`` dimension (R replicas, B / R examples each)
and the weights are replicated: data parallel, every op batch-parallel. Batch norm's statistics are
those of groups of G consecutive replicas (`bn_groups` = R / G groups of B / groups examples): G = 1
gives each replica its own statistics, G = R the global batch's. Each example carries its group as a
one-hot row (`group_onehot`, placed with the batch); a layer's per-example sums [B, C] contracted with
it give the groups' sums [groups, C] (DTensor all-reduces that small tensor over the replicas), and the
same one-hot hands each example its group's mean and variance back, all without a reshape of a sharded
tensor (which loses the sharding) and without gathering activations. Laying the batch out as
[groups, B / groups, ...] over a (group, replica) mesh instead was tried: DTensor's convolution treats
only dimension 0 as batch and gathers dimension 1, so every replica of a group computed the whole
group's batch.

Without a mesh the same code runs on plain variables: `ResNet(config)` with the same `bn_groups` is
the unsharded reference the tests compare with.

v1.5: the stride of a bottleneck block sits on its 3x3 convolution; the projection shortcut is a
strided 1x1 convolution with batch norm; each residual branch's last batch-norm scale starts at zero
(`zero_init_residual`), so every block starts as the identity. Depths 18 and 34 use basic blocks, 50
and 101 bottlenecks. `small_inputs` swaps the 7x7/2 stem and its max pool for a 3x3/1 stem (digits,
CIFAR-sized images).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from headrace.core import mesh as mesh_lib
from headrace.core.errors import ConfigError

__all__ = ["BLOCKS", "ResNet", "ResNetConfig", "batch_norm", "group_onehot", "resnet_mesh", "sgd_step"]

# depth -> (block kind, blocks per stage)
BLOCKS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    depth: int = 50
    num_classes: int = 1000
    width: int = 64  # channels of the stem and of the first stage (x4 out of a bottleneck stage)
    small_inputs: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    zero_init_residual: bool = True
    dtype: str = "float32"  # of the weights and the computation; float64 for exact equivalence tests
    seed: int = 0

    def check(self) -> None:
        if self.depth not in BLOCKS:
            raise ConfigError(f"--depth {self.depth}: one of {sorted(BLOCKS)}")
        if self.num_classes < 2 or self.width < 1:
            raise ConfigError("num_classes >= 2 and width >= 1")


def resnet_mesh(replicas: int, group_size: int):
    """The ``batch=R`` mesh and the number of batch-norm groups of `group_size` replicas on it."""
    if group_size < 1 or replicas % group_size:
        raise ConfigError(f"--bn-group-size {group_size} does not divide the {replicas} replicas")
    return mesh_lib.create_mesh([("batch", replicas)]), replicas // group_size


def group_onehot(batch: int, groups: int) -> np.ndarray:
    """[batch, groups] float: example b belongs to group b // (batch / groups)."""
    if batch % groups:
        raise ConfigError(f"batch of {batch} does not split into {groups} batch-norm groups")
    return np.repeat(np.eye(groups, dtype=np.float32), batch // groups, axis=0)


def batch_norm(x, scale, offset, *, epsilon: float, onehot=None, mean=None, variance=None):
    """Normalises x [B, H, W, C] by the statistics of each example's group (`onehot` [B, groups]), or
    by the given `mean` and `variance` [C] (inference). Returns (y, group mean [groups, C], variance)."""
    if mean is not None:
        y = (x - mean) * tf.math.rsqrt(variance + epsilon) * scale + offset
        return y, mean, variance
    onehot = tf.cast(onehot, x.dtype)
    per_group = tf.reduce_sum(onehot, axis=0) * tf.cast(x.shape[1] * x.shape[2], x.dtype)  # [groups]
    group_mean = tf.einsum("bc,bg->gc", tf.reduce_sum(x, axis=[1, 2]), onehot) / per_group[:, None]
    centred = x - tf.einsum("bg,gc->bc", onehot, group_mean)[:, None, None, :]
    group_var = tf.einsum("bc,bg->gc", tf.reduce_sum(tf.square(centred), axis=[1, 2]), onehot)
    group_var = group_var / per_group[:, None]
    inv = tf.einsum("bg,gc->bc", onehot, tf.math.rsqrt(group_var + epsilon))[:, None, None, :]
    return centred * inv * scale + offset, group_mean, group_var


class ResNet(tf.Module):
    """See the module docstring. Weights are replicated on the mesh (data parallel); the batch is not."""

    def __init__(self, config: ResNetConfig, mesh=None, bn_groups: int = 1):
        super().__init__(name="resnet")
        config.check()
        self.config = c = config
        self.mesh, self.bn_groups = mesh, bn_groups
        if mesh is not None and list(mesh.dim_names) != ["batch"]:
            raise ConfigError(f"a ResNet mesh has one dimension, batch, not {list(mesh.dim_names)}")
        replicas = mesh.dim_size("batch") if mesh is not None else bn_groups
        if bn_groups < 1 or replicas % bn_groups:
            raise ConfigError(f"{bn_groups} batch-norm groups do not divide the {replicas} replicas")
        seeds = iter(range(c.seed * 10_000 + 1, c.seed * 10_000 + 10_000))
        self._trainable: list[tf.Variable] = []
        self._norms: list[dict] = []

        def var(name, value, trainable=True):
            lay = mesh_lib.replicated(mesh, len(value.shape)) if mesh is not None else None
            v = mesh_lib.variable(np.asarray(value, c.dtype), lay, name=name, trainable=trainable)
            if trainable:
                self._trainable.append(v)
            return v

        def conv(name, k, cin, cout):
            std = math.sqrt(2.0 / (k * k * cout))  # He normal, fan-out (as the reference ResNets)
            return var(
                name, mesh_lib.initial_value((k, k, cin, cout), next(seeds), kind="normal", stddev=std)
            )

        def bn(name, channels, zero=False):
            layer = {
                "scale": var(f"{name}/gamma", np.zeros(channels) if zero else np.ones(channels)),
                "offset": var(f"{name}/beta", np.zeros(channels)),
                "mean": var(f"{name}/moving_mean", np.zeros(channels), trainable=False),
                "variance": var(f"{name}/moving_variance", np.ones(channels), trainable=False),
            }
            self._norms.append(layer)
            return layer

        kind, stages = BLOCKS[c.depth]
        stem_k = 3 if c.small_inputs else 7
        self.stem = {"conv": conv("stem/conv", stem_k, 3, c.width), "bn": bn("stem/bn", c.width)}
        self.blocks = []
        cin = c.width
        for s, count in enumerate(stages):
            mid = c.width * 2**s
            cout = mid * 4 if kind == "bottleneck" else mid
            for b in range(count):
                stride = 2 if b == 0 and s > 0 else 1
                p = f"stage{s + 1}/block{b + 1}"
                zero = c.zero_init_residual
                if kind == "bottleneck":
                    block = {
                        "conv1": conv(f"{p}/conv1", 1, cin, mid),
                        "bn1": bn(f"{p}/bn1", mid),
                        "conv2": conv(f"{p}/conv2", 3, mid, mid),
                        "bn2": bn(f"{p}/bn2", mid),
                        "conv3": conv(f"{p}/conv3", 1, mid, cout),
                        "bn3": bn(f"{p}/bn3", cout, zero),
                    }
                else:
                    block = {
                        "conv1": conv(f"{p}/conv1", 3, cin, mid),
                        "bn1": bn(f"{p}/bn1", mid),
                        "conv2": conv(f"{p}/conv2", 3, mid, cout),
                        "bn2": bn(f"{p}/bn2", cout, zero),
                    }
                if stride != 1 or cin != cout:
                    block["proj"] = conv(f"{p}/proj", 1, cin, cout)
                    block["proj_bn"] = bn(f"{p}/proj_bn", cout)
                block["stride"] = stride
                self.blocks.append(block)
                cin = cout
        limit = 1.0 / math.sqrt(cin)
        rng = np.random.default_rng(c.seed)
        self.head = {
            "kernel": var("head/kernel", rng.uniform(-limit, limit, (cin, c.num_classes))),
            "bias": var("head/bias", np.zeros(c.num_classes)),
        }
        self.features = cin

    # -- variables --------------------------------------------------------------------------------

    @property
    def weights(self) -> list[tf.Variable]:
        """The trainable variables, in creation order."""
        return list(self._trainable)

    @property
    def batch_norms(self) -> list[dict]:
        return list(self._norms)

    def decay_mask(self) -> list[bool]:
        """Which weights take weight decay: kernels, not batch-norm scales and offsets or biases."""
        return [len(w.shape) > 1 for w in self._trainable]

    def place(self, images, labels=None):
        """Host arrays [B, H, W, C] (and [B]) with their groups' one-hot rows, split over the mesh:
        (images, onehot[, labels])."""
        images = np.asarray(images)
        out = [images, group_onehot(images.shape[0], self.bn_groups)]
        if labels is not None:
            out.append(np.asarray(labels))
        if self.mesh is None:
            return tuple(tf.convert_to_tensor(x) for x in out)
        return tuple(mesh_lib.shard_batch(self.mesh, x) for x in out)

    # -- the network ------------------------------------------------------------------------------

    def _conv(self, x, kernel, stride: int = 1):
        k = kernel.shape[0]
        if stride == 1:
            return tf.nn.conv2d(x, kernel, 1, "SAME")
        # Explicit padding for strided convolutions, as the reference v1.5 models (fixed_padding).
        total = k - 1
        pads = [[0, 0], [total // 2, total - total // 2], [total // 2, total - total // 2], [0, 0]]
        return tf.nn.conv2d(tf.pad(x, pads), kernel, stride, "VALID")

    def _bn(self, x, layer, onehot, stats: list | None):
        """Batch norm by the groups' statistics when `onehot` is given (training), else by the moving ones."""
        eps = self.config.bn_epsilon
        if onehot is None:
            y, _, _ = batch_norm(
                x,
                layer["scale"],
                layer["offset"],
                epsilon=eps,
                mean=layer["mean"],
                variance=layer["variance"],
            )
            return y
        y, mean, var = batch_norm(x, layer["scale"], layer["offset"], epsilon=eps, onehot=onehot)
        if stats is not None:
            stats.append((layer, mean, var))
        return y

    def __call__(self, images, onehot=None, stats: list | None = None):
        """Logits [B, classes] of images [B, H, W, 3]. With `onehot` (training), batch norm uses each
        group's statistics and appends (layer, mean [groups, C], variance) to `stats`; without, the
        moving statistics (inference)."""
        c = self.config
        bn = lambda x, layer: self._bn(x, layer, onehot, stats)
        x = self._conv(tf.cast(images, c.dtype), self.stem["conv"], 1 if c.small_inputs else 2)
        x = tf.nn.relu(bn(x, self.stem["bn"]))
        if not c.small_inputs:
            x = tf.nn.max_pool2d(x, 3, 2, "SAME")
        for block in self.blocks:
            shortcut = x
            if "proj" in block:
                shortcut = bn(self._conv(x, block["proj"], block["stride"]), block["proj_bn"])
            if "conv3" in block:
                y = tf.nn.relu(bn(self._conv(x, block["conv1"]), block["bn1"]))
                y = tf.nn.relu(bn(self._conv(y, block["conv2"], block["stride"]), block["bn2"]))
                y = bn(self._conv(y, block["conv3"]), block["bn3"])
            else:
                y = tf.nn.relu(bn(self._conv(x, block["conv1"], block["stride"]), block["bn1"]))
                y = bn(self._conv(y, block["conv2"]), block["bn2"])
            x = tf.nn.relu(y + shortcut)
        pooled = tf.reduce_mean(x, axis=[1, 2])  # [B, C]
        return tf.einsum("bc,ck->bk", pooled, self.head["kernel"]) + self.head["bias"]

    def loss(self, images, onehot, labels, *, label_smoothing: float = 0.0, stats: list | None = None):
        """Mean softmax cross-entropy (with label smoothing) of the batch, in training mode."""
        logits = self(images, onehot, stats=stats)
        k = self.config.num_classes
        target = tf.one_hot(tf.cast(labels, tf.int32), k, dtype=logits.dtype)
        if label_smoothing:
            target = target * (1.0 - label_smoothing) + label_smoothing / k
        log_p = tf.nn.log_softmax(logits, axis=-1)
        return -tf.reduce_mean(tf.reduce_sum(target * log_p, axis=-1)), logits

    def update_moving_statistics(self, stats: list) -> None:
        """Moving mean and variance toward the step's statistics, averaged over the groups."""
        m = self.config.bn_momentum
        for layer, mean, var in stats:
            layer["mean"].assign(m * layer["mean"] + (1 - m) * tf.reduce_mean(mean, axis=0))
            layer["variance"].assign(m * layer["variance"] + (1 - m) * tf.reduce_mean(var, axis=0))


def sgd_step(model: ResNet, optimizer, learning_rate: float = 0.1, label_smoothing: float = 0.0):
    """A compiled training step at a fixed rate, (images, onehot, labels) -> loss: the trainer's step
    without its schedule and metrics (for benchmarks)."""

    @tf.function
    def step(images, onehot, labels):
        stats = []
        with tf.GradientTape() as tape:
            loss, _ = model.loss(images, onehot, labels, label_smoothing=label_smoothing, stats=stats)
        optimizer.apply(tape.gradient(loss, model.weights), model.weights, learning_rate)
        model.update_moving_statistics(stats)
        return loss

    return step
