"""A 3D U-Net (Cicek et al. 2016) on spatially partitioned activations (`headrace.models.spatial`).

Levels ``0..L-1``: at each, two (conv 3^3 -> instance norm -> ReLU); between levels, 2^3 max pooling on the
way down and a stride-2 transposed convolution on the way up, whose output is concatenated with the skip
connection of the same level; a 1^3 convolution gives two logits (background, foreground). Channels double
per level from `channels`. Loss: softmax cross-entropy + (1 - soft Dice of the foreground).

Weights are ordinary variables (on the first device), read by every block; they are drawn from a numpy
generator seeded by `seed`, so that models built with any partition count start identical and can be
compared number for number.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from headrace.models import spatial
from headrace.models.spatial import Partition

__all__ = ["UNet3D"]


class UNet3D(tf.Module):
    def __init__(self, *, channels: int = 8, levels: int = 3, in_channels: int = 1, seed: int = 0):
        super().__init__(name="unet3d")
        if levels < 1:
            raise ValueError("levels must be >= 1")
        self.channels, self.levels, self.in_channels = channels, levels, in_channels
        rng = np.random.default_rng(seed)
        self._vars: list[tf.Variable] = []

        def var(shape, fan_in, name):
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape).astype(np.float32)
            v = tf.Variable(value, name=name)
            self._vars.append(v)
            return v

        def const(shape, value, name):
            v = tf.Variable(np.full(shape, value, np.float32), name=name)
            self._vars.append(v)
            return v

        def block(cin, cout, name):
            return {
                "w1": var([3, 3, 3, cin, cout], 27 * cin, f"{name}_w1"),
                "g1": const([cout], 1.0, f"{name}_g1"),
                "b1": const([cout], 0.0, f"{name}_b1"),
                "w2": var([3, 3, 3, cout, cout], 27 * cout, f"{name}_w2"),
                "g2": const([cout], 1.0, f"{name}_g2"),
                "b2": const([cout], 0.0, f"{name}_b2"),
            }

        widths = [channels * 2**lvl for lvl in range(levels)]
        self.down = []
        cin = in_channels
        for lvl, c in enumerate(widths):
            self.down.append(block(cin, c, f"down{lvl}"))
            cin = c
        self.up = []
        for lvl in reversed(range(levels - 1)):
            c_low, c = widths[lvl + 1], widths[lvl]
            self.up.append(
                {
                    "up_w": var([2, 2, 2, c, c_low], 8 * c_low, f"up{lvl}_w"),
                    "up_b": const([c], 0.0, f"up{lvl}_b"),
                    **block(2 * c, c, f"up{lvl}"),
                }
            )
        self.head_w = var([1, 1, 1, widths[0], 2], widths[0], "head_w")
        self.head_b = const([2], 0.0, "head_b")

    @property
    def weights(self) -> list[tf.Variable]:
        return list(self._vars)

    @property
    def multiple(self) -> int:
        """Depth, height and width of an input must be multiples of this (2^(levels-1))."""
        return 2 ** (self.levels - 1)

    def _double_conv(self, x, p, part: Partition):
        for i in ("1", "2"):
            x = spatial.conv3d(x, p[f"w{i}"], None, part)
            x = spatial.instance_norm(x, p[f"g{i}"], p[f"b{i}"], part)
            x = spatial.relu(x, part)
        return x

    def logits(self, blocks: list[tf.Tensor], partition: Partition) -> list[tf.Tensor]:
        """Per-block logits [B, d_i, H, W, 2] of the partitioned input blocks [B, d_i, H, W, C]."""
        skips = []
        x = blocks
        for lvl, p in enumerate(self.down):
            part = partition.at_level(lvl)
            x = self._double_conv(x, p, part)
            if lvl < self.levels - 1:
                skips.append(x)
                x = spatial.max_pool(x, part, level=lvl)
        for i, lvl in enumerate(reversed(range(self.levels - 1))):
            p = self.up[i]
            part = partition.at_level(lvl)
            x = spatial.upsample(x, p["up_w"], p["up_b"], part)
            x = spatial.concat_channels(skips[lvl], x, part)
            x = self._double_conv(x, p, part)
        return spatial.conv3d(x, self.head_w, self.head_b, partition)

    def loss(self, blocks, label_blocks, partition: Partition) -> tuple[tf.Tensor, tf.Tensor]:
        """(cross-entropy + 1 - dice, dice) over the whole partitioned volume."""
        logits = self.logits(blocks, partition)
        ce = spatial.cross_entropy(logits, label_blocks, partition)
        dice = spatial.soft_dice(logits, label_blocks, partition)
        return ce + (1.0 - dice), dice

    def check_shape(self, shape) -> None:
        """Raises a clear error when a [D, H, W] input cannot go through every pooling level."""
        from headrace.core.errors import ConfigError

        bad = [n for n in shape if n % self.multiple]
        if bad:
            raise ConfigError(
                f"input {tuple(shape)}: D, H and W must be multiples of {self.multiple} "
                f"(the U-Net halves them {self.levels - 1} times)"
            )
