"""Random training patches of whole volumes, as a tf.data pipeline (stateless, reproducible).

For a labelled volume, a patch is centred on a random foreground voxel with probability
`foreground_fraction` and on a background voxel otherwise (the first background voxel among 16 uniform
draws), so that small structures are seen as often as asked. Unlabelled volumes give uniform patches.
Patches of volumes smaller than the patch are padded with the volume's minimum. Deterministic for a given
seed: stateless random ops keyed by the volume's position in the stream and the patch number.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

__all__ = ["sample_patches"]


def _crop(volume, label, centre, patch, pad_value):
    patch_t = tf.constant(patch, tf.int64)
    shape = tf.shape(volume, out_type=tf.int64)
    # Pad volumes smaller than the patch (at the end of each axis), then clamp the window inside.
    pad = tf.maximum(patch_t - shape, 0)
    paddings = tf.stack([tf.zeros_like(pad), pad], axis=1)
    volume = tf.pad(volume, paddings, constant_values=pad_value)
    label = tf.pad(label, paddings)
    start = tf.clip_by_value(centre - patch_t // 2, 0, tf.maximum(shape + pad - patch_t, 0))
    return tf.slice(volume, start, patch_t), tf.slice(label, start, patch_t), start


def sample_patches(
    volumes,
    patch: Sequence[int],
    *,
    patches_per_volume: int = 8,
    foreground_fraction: float = 0.5,
    seed: int = 0,
    shuffle: bool = True,
):
    """A dataset of whole volumes (``{"volume" [D, H, W], "label" [D, H, W], "id"}``) -> random
    [pd, ph, pw] patches ``{"volume", "label", "id", "start", "foreground"}`` (see the module docstring)."""
    patch = tuple(int(p) for p in patch)
    volumes = volumes.enumerate()

    def per_volume(i, v):
        foreground = tf.where(v["label"] > 0)  # [N, 3]; empty without a label
        shape = tf.shape(v["volume"], out_type=tf.int64)
        minimum = tf.reduce_min(v["volume"])

        def one(j):
            s = tf.stack([tf.cast(seed, tf.int64), i * 100_003 + j])
            coin = tf.random.stateless_uniform([], seed=s)
            want_fg = tf.logical_and(coin < foreground_fraction, tf.shape(foreground)[0] > 0)

            def fg():
                k = tf.random.stateless_uniform(
                    [], seed=s + 1, maxval=tf.shape(foreground, out_type=tf.int64)[0], dtype=tf.int64
                )
                return foreground[k]

            def bg():
                draws = tf.random.stateless_uniform([16, 3], seed=s + 2, minval=0.0, maxval=1.0)
                cand = tf.cast(draws * tf.cast(shape, tf.float32), tf.int64)
                cand = tf.minimum(cand, shape - 1)
                is_bg = tf.gather_nd(v["label"], cand) == 0
                first = tf.argmax(tf.cast(is_bg, tf.int32))
                return cand[first]

            centre = tf.cond(want_fg, fg, bg)
            vol, lab, start = _crop(v["volume"], v["label"], centre, patch, minimum)
            return {
                "volume": tf.ensure_shape(vol, patch),
                "label": tf.ensure_shape(lab, patch),
                "id": v["id"],
                "start": start,
                "foreground": want_fg,
            }

        return tf.data.Dataset.range(patches_per_volume).map(one)

    ds = volumes.flat_map(per_volume)
    if shuffle:
        ds = ds.shuffle(4 * patches_per_volume, seed=seed)
    return ds
