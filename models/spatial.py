"""Spatial partitioning of 3D activations across devices, with halo exchange (ours: DTensor's is TPU-only).

A volume ``[B, D, H, W, C]`` (NDHWC) is cut along depth into P blocks ``[B, d_i, H, W, C]``, block i on
device i; every op below takes and returns the list of blocks, so activations are never whole anywhere.

* `conv3d` (stride 1, odd kernel k, SAME): each block takes ``h = k // 2`` boundary slices from its
  neighbours (walking past a neighbour thinner than the halo into the next one), zeros at the volume's
  edges exactly as SAME padding has, then convolves VALID in depth (H and W are zero-padded locally). The
  output equals the unpartitioned convolution; gradients flow back through the exchange into the
  neighbours, and the weights, read by every block, get their gradients summed over blocks by autodiff.
* `max_pool` (2x2x2, stride 2): local when every block's depth is even. `Partition` chooses block
  boundaries on multiples of 2^(levels-1), so this holds at every level of a U-Net; a boundary inside a
  pooling window is refused with an error naming the level.
* `upsample` (transposed conv, kernel 2, stride 2): output slices 2j, 2j+1 depend on input slice j only,
  so it is local. Skip connections join blocks of the same level, which share boundaries: local.
* `instance_norm`: the statistics (per sample and channel over D, H, W) are whole-volume statistics: each
  block contributes its sums, they are added across devices, and every block normalises with the totals.
  Per-block statistics would be the boundary bug here; the P=1 vs P=4 test would catch it.
* `soft_dice` and `cross_entropy` reduce the same way: partial sums per block, totals across blocks.

Memory per device is the block's activations plus two halos per convolution (``2 h H W C``), i.e. close
to 1/P of the unpartitioned peak (bench/unet_memory.py measures it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import tensorflow as tf

from headrace.core.errors import ConfigError

__all__ = [
    "Partition",
    "concat_channels",
    "conv3d",
    "cross_entropy",
    "gather",
    "instance_norm",
    "max_pool",
    "relu",
    "scatter",
    "soft_dice",
    "upsample",
]


@dataclasses.dataclass(frozen=True)
class Partition:
    """The volume's slabs along depth (at full resolution) and the device of each slab.

    A device holds one block of consecutive slabs. Computing in slabs whose number does not depend on the
    device count makes the arithmetic identical for any P that divides it: the same convolutions on the
    same shapes, partial sums added in the same order. That is what makes ``--partitions 1`` and
    ``--partitions 4`` train to the same numbers (float32 Adam amplifies 1e-7 summation-order
    differences to 1e-4 in the loss within about eight steps otherwise; measured).
    """

    sizes: tuple[int, ...]
    devices: tuple[str, ...]

    @classmethod
    def even(
        cls, depth: int, parts: int, devices: Sequence[str], *, multiple: int = 1, slabs: int | None = None
    ) -> Partition:
        """Splits `depth` into `slabs` slabs (default: one per part) whose depths are multiples of
        `multiple` (2^(levels-1) for a U-Net with `levels` resolutions), as equal as that allows, and
        gives each of `parts` devices the same number of consecutive slabs. Raises ConfigError when the
        depth cannot be split so."""
        slabs = slabs or parts
        if parts < 1:
            raise ConfigError(f"--partitions {parts}: must be >= 1")
        if slabs % parts:
            raise ConfigError(f"--slabs {slabs} must be a multiple of --partitions {parts}")
        if depth % multiple:
            raise ConfigError(
                f"depth {depth} is not a multiple of {multiple}: a U-Net with this many levels halves the "
                f"depth {multiple.bit_length() - 1} times; use a patch depth that is a multiple of {multiple}"
            )
        units = depth // multiple
        if slabs > units:
            raise ConfigError(
                f"--partitions {parts} ({slabs} slabs) needs a depth of at least {slabs * multiple} (each slab "
                f"must keep a multiple of {multiple} slices so that pooling never straddles blocks); "
                f"depth is {depth}"
            )
        if len(devices) < parts:
            raise ConfigError(f"--partitions {parts}: only {len(devices)} devices available")
        base, extra = divmod(units, slabs)
        sizes = tuple((base + (i < extra)) * multiple for i in range(slabs))
        return cls(sizes=sizes, devices=tuple(devices[i * parts // slabs] for i in range(slabs)))

    def at_level(self, level: int) -> Partition:
        factor = 2**level
        if any(s % factor for s in self.sizes):
            raise ConfigError(f"block depths {self.sizes} are not all divisible by {factor} at level {level}")
        return Partition(tuple(s // factor for s in self.sizes), self.devices)

    @property
    def parts(self) -> int:
        """The number of devices."""
        return len(dict.fromkeys(self.devices))

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """The depth each device holds."""
        sizes: dict[str, int] = {}
        for size, device in zip(self.sizes, self.devices):
            sizes[device] = sizes.get(device, 0) + size
        return tuple(sizes.values())


def scatter(x: tf.Tensor, partition: Partition) -> list[tf.Tensor]:
    """Cuts [B, D, ...] into the partition's blocks, each placed on its device."""
    blocks = tf.split(x, list(partition.sizes), axis=1)
    out = []
    for block, device in zip(blocks, partition.devices):
        with tf.device(device):
            out.append(tf.identity(block))
    return out


def gather(blocks: Sequence[tf.Tensor]) -> tf.Tensor:
    """The whole tensor (for outputs and tests; training never needs it)."""
    return tf.concat(list(blocks), axis=1)


def _depth(t: tf.Tensor) -> int:
    return int(t.shape[1])


def _halo(blocks: Sequence[tf.Tensor], i: int, h: int, side: str) -> tf.Tensor:
    """The `h` slices just before (side "lo") or after ("hi") block i, zeros beyond the volume."""
    parts, need = [], h
    step = -1 if side == "lo" else 1
    j = i + step
    while need > 0 and 0 <= j < len(blocks):
        d = _depth(blocks[j])
        take = min(need, d)
        part = blocks[j][:, d - take :] if side == "lo" else blocks[j][:, :take]
        parts.append(part)
        need -= take
        j += step
    if side == "lo":
        parts.reverse()
    if need > 0:
        ref = blocks[i]
        shape = [tf.shape(ref)[0], need, *ref.shape[2:]]
        zeros = tf.zeros(shape, ref.dtype)
        parts = [zeros, *parts] if side == "lo" else [*parts, zeros]
    return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]


def conv3d(blocks: Sequence[tf.Tensor], kernel: tf.Tensor, bias: tf.Tensor | None, partition: Partition):
    """SAME, stride-1 3D convolution of the partitioned volume (kernel [k, k, k, Cin, Cout], k odd)."""
    k = int(kernel.shape[0])
    if k % 2 == 0 or kernel.shape[1] != k or kernel.shape[2] != k:
        raise ValueError(f"conv3d: cubic odd kernels only, got {kernel.shape}")
    h = k // 2
    out = []
    for i, (block, device) in enumerate(zip(blocks, partition.devices)):
        with tf.device(device):
            if h:
                x = tf.concat([_halo(blocks, i, h, "lo"), block, _halo(blocks, i, h, "hi")], axis=1)
                x = tf.pad(x, [[0, 0], [0, 0], [h, h], [h, h], [0, 0]])
            else:
                x = block
            y = tf.nn.conv3d(x, kernel, strides=[1, 1, 1, 1, 1], padding="VALID")
            if bias is not None:
                y = y + bias
            out.append(y)
    return out


def _per_block(fn, blocks: Sequence[tf.Tensor], partition: Partition) -> list[tf.Tensor]:
    out = []
    for block, device in zip(blocks, partition.devices):
        with tf.device(device):
            out.append(fn(block))
    return out


def relu(blocks, partition: Partition):
    return _per_block(tf.nn.relu, blocks, partition)


def max_pool(blocks, partition: Partition, level: int = 0):
    """2x2x2 max pooling, stride 2; every block's depth must be even (see `Partition.even`)."""
    odd = [_depth(b) for b in blocks if _depth(b) % 2]
    if odd:
        raise ConfigError(
            f"max_pool at level {level}: block depths {[_depth(b) for b in blocks]} must be even"
        )
    return _per_block(lambda b: tf.nn.max_pool3d(b, ksize=2, strides=2, padding="VALID"), blocks, partition)


def upsample(blocks, kernel: tf.Tensor, bias: tf.Tensor, partition: Partition):
    """Transposed convolution, kernel 2, stride 2 (kernel [2, 2, 2, Cout, Cin]): depth doubles per block."""

    def up(b):
        shape = tf.shape(b)
        out_shape = tf.stack([shape[0], 2 * shape[1], 2 * shape[2], 2 * shape[3], kernel.shape[3]])
        y = tf.nn.conv3d_transpose(b, kernel, out_shape, strides=[1, 2, 2, 2, 1], padding="VALID")
        return y + bias

    return _per_block(up, blocks, partition)


def concat_channels(a, b, partition: Partition):
    return [tf.concat([x, y], axis=-1) for x, y in zip(a, b)]


def instance_norm(blocks, gamma: tf.Tensor, beta: tf.Tensor, partition: Partition, eps: float = 1e-5):
    """Normalises each sample and channel over the whole volume: block sums added across devices.

    Two passes (the mean, then the sum of squared deviations), each one sum across devices: the one-pass
    E[x^2] - E[x]^2 loses the variance of small, offset activations to cancellation, and partial sums
    taken in another order then disagree between partition counts.
    """
    sums, counts = [], []
    for block, device in zip(blocks, partition.devices):
        with tf.device(device):
            sums.append(tf.reduce_sum(block, axis=[1, 2, 3], keepdims=True))
            counts.append(tf.cast(tf.reduce_prod(tf.shape(block)[1:4]), block.dtype))
    n = tf.add_n(counts)
    mean = tf.add_n(sums) / n
    squares = []
    for block, device in zip(blocks, partition.devices):
        with tf.device(device):
            squares.append(tf.reduce_sum(tf.square(block - mean), axis=[1, 2, 3], keepdims=True))
    var = tf.add_n(squares) / n
    scale = gamma * tf.math.rsqrt(var + eps)
    return _per_block(lambda b: (b - mean) * scale + beta, blocks, partition)


def cross_entropy(logits_blocks, label_blocks, partition: Partition) -> tf.Tensor:
    """Mean softmax cross-entropy over every voxel of every block (labels int [B, d, H, W])."""
    totals, counts = [], []
    for logits, labels, device in zip(logits_blocks, label_blocks, partition.devices):
        with tf.device(device):
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            totals.append(tf.reduce_sum(ce))
            counts.append(tf.cast(tf.size(ce), ce.dtype))
    return tf.add_n(totals) / tf.add_n(counts)


def soft_dice(logits_blocks, label_blocks, partition: Partition, eps: float = 1.0) -> tf.Tensor:
    """Soft Dice of the foreground class (softmax channel 1) over the whole volume, per sample, averaged."""
    inter, psum, ysum = [], [], []
    for logits, labels, device in zip(logits_blocks, label_blocks, partition.devices):
        with tf.device(device):
            p = tf.nn.softmax(logits)[..., 1]
            y = tf.cast(labels > 0, p.dtype)
            inter.append(tf.reduce_sum(p * y, axis=[1, 2, 3]))
            psum.append(tf.reduce_sum(p, axis=[1, 2, 3]))
            ysum.append(tf.reduce_sum(y, axis=[1, 2, 3]))
    dice = (2.0 * tf.add_n(inter) + eps) / (tf.add_n(psum) + tf.add_n(ysum) + eps)
    return tf.reduce_mean(dice)
