"""3D volumes in numpy: orientation, resampling and overlapping blocks, without holding a volume twice.

Orientation convention (every volume headrace writes, DICOM or NIfTI): the array is ``[D, H, W]`` with

* ``D`` (depth) running inferior -> superior,
* ``H`` (height) running anterior -> posterior,
* ``W`` (width) running patient right -> left,

i.e. the closest axes to DICOM's patient coordinate system (LPS) in the order z, y, x. For the usual
axial acquisition (ImageOrientationPatient ``1,0,0,0,1,0``) this is exactly the DICOM slices stacked in
ascending position: ``volume[k]`` is slice k as stored (row 0 anterior, column 0 the patient's right),
the way a radiologist views it. NIfTI volumes (RAS+ world) are brought to the same axes, and spacing is
always ``(z, y, x)`` in mm. Reorientation is a permutation and flips of the grid only: no interpolation,
so oblique scans keep their (slightly tilted) grid on the closest axes.

Resampling (`resample`) maps output voxel ``o`` to input coordinate ``o * new_spacing / spacing`` on
every axis: voxel centres of the first voxel coincide, the output covers the input extent (rounded to
whole voxels) and coordinates past the last voxel take its value. Images are interpolated trilinearly,
labels take the nearest voxel; the result equals `scipy.ndimage.map_coordinates` (order 1 or 0,
``mode="nearest"``) on the same grid, computed one output slice at a time in float64, so the only
extra memory is the output volume.

`sliding_window` segments a volume of any size with a patch predictor (overlapping windows averaged).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

__all__ = [
    "Block",
    "GeometryError",
    "acquisition_view",
    "block_grid",
    "canonical_axes",
    "canonical_shape",
    "iter_blocks",
    "reorient",
    "resample",
    "resampled_shape",
    "sliding_window",
]

# Patient axis (LPS component) that each output axis follows: D <- z (superior), H <- y (posterior),
# W <- x (left).
_TARGET = (2, 1, 0)


class GeometryError(ValueError):
    """A volume's geometry cannot be used (the message says which attribute and why).

    `kind` is a short category for reports (``geometry``, ``duplicate_slice``, ``varying_spacing``...).
    """

    def __init__(self, message: str, kind: str = "geometry"):
        super().__init__(message)
        self.kind = kind


def canonical_axes(directions: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """``(perm, flips)`` bringing an array to the [D, H, W] convention of this module.

    `directions` is [3, 3]: row ``a`` is the direction (LPS, any length) in which array axis ``a``
    increases. Output axis ``k`` is input axis ``perm[k]``, reversed when ``flips[k]``.
    """
    d = np.asarray(directions, dtype=np.float64)
    norms = np.linalg.norm(d, axis=1)
    if d.shape != (3, 3) or not np.all(np.isfinite(d)) or np.any(norms < 1e-6):
        raise GeometryError(f"direction vectors are degenerate: {d.tolist()}")
    unit = d / norms[:, None]
    dominant = np.abs(unit).argmax(axis=1)
    if sorted(dominant.tolist()) != [0, 1, 2]:
        raise GeometryError(f"two axes point along the same patient axis: {np.round(unit, 3).tolist()}")
    perm = tuple(int(np.flatnonzero(dominant == c)[0]) for c in _TARGET)
    flips = tuple(bool(unit[perm[k], _TARGET[k]] < 0) for k in range(3))
    return perm, flips


def reorient(
    volume: np.ndarray, spacing: Sequence[float], directions: np.ndarray, *, copy: bool = True
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The volume and its spacing on the [D, H, W] axes: a C-contiguous array (no copy when nothing
    moves), or with ``copy=False`` a strided view, for callers that convert it while copying."""
    perm, flips = canonical_axes(directions)
    out = np.transpose(volume, perm)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis)
    spacing = tuple(float(spacing[p]) for p in perm)
    return (np.ascontiguousarray(out) if copy else out), spacing  # type: ignore[return-value]


def acquisition_view(out: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """A view of `out` ([D, H, W]) indexed like the acquired array, so a reader can fill the final layout
    slice by slice (``view[k] = slice_k``) instead of stacking and then reorienting a second copy."""
    perm, flips = canonical_axes(directions)
    view = out
    for axis, flip in enumerate(flips):
        if flip:
            view = np.flip(view, axis)
    return np.transpose(view, np.argsort(perm))


def canonical_shape(shape: Sequence[int], directions: np.ndarray) -> tuple[int, int, int]:
    """The [D, H, W] shape of an acquired array of `shape`."""
    perm, _ = canonical_axes(directions)
    return tuple(int(shape[p]) for p in perm)  # type: ignore[return-value]


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """The output shape of `resample`: the input extent in whole voxels of the new spacing (>= 1)."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, new_spacing))  # type: ignore[return-value]


def _coordinates(n: int, m: int, step: float) -> np.ndarray:
    # Exactly the coordinates a reference would build with np.arange(m) * step, clamped (mode="nearest").
    return np.clip(np.arange(m) * step, 0, n - 1)


def _linear(n: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = np.minimum(np.floor(x).astype(np.int64), max(n - 2, 0))
    w = x - lo
    if n == 1:
        w = np.zeros_like(x)
    return lo, w


def resample(
    volume: np.ndarray,
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    order: int = 1,
) -> np.ndarray:
    """`volume` ([D, H, W]) on the grid of `new_spacing`: trilinear (order 1, float32 out) or nearest
    (order 0, dtype kept). See the module docstring for the grid."""
    if volume.ndim != 3:
        raise GeometryError(f"resample expects a 3D volume, got shape {volume.shape}")
    if any(t <= 0 for t in new_spacing) or any(s <= 0 for s in spacing):
        raise GeometryError(f"spacings must be positive: {tuple(spacing)} -> {tuple(new_spacing)}")
    shape = resampled_shape(volume.shape, spacing, new_spacing)
    coords = [_coordinates(n, m, t / s) for n, m, s, t in zip(volume.shape, shape, spacing, new_spacing)]
    if order == 0:
        # map_coordinates(order=0) rounds half up: floor(x + 0.5).
        index = [np.minimum(np.floor(x + 0.5).astype(np.int64), n - 1) for x, n in zip(coords, volume.shape)]
        return volume[np.ix_(*index)]
    if order != 1:
        raise ValueError(f"order must be 0 or 1, got {order}")
    (lo0, w0), (lo1, w1), (lo2, w2) = (_linear(n, x) for n, x in zip(volume.shape, coords))
    hi1 = np.minimum(lo1 + 1, volume.shape[1] - 1)
    hi2 = np.minimum(lo2 + 1, volume.shape[2] - 1)
    out = np.empty(shape, np.float32)
    last = volume.shape[0] - 1
    for k in range(shape[0]):
        a = volume[lo0[k]].astype(np.float64)
        if w0[k]:
            a += (volume[min(lo0[k] + 1, last)] - a) * w0[k]
        rows = a[lo1] + (a[hi1] - a[lo1]) * w1[:, None]
        out[k] = rows[:, lo2] + (rows[:, hi2] - rows[:, lo2]) * w2[None, :]
    return out


@dataclasses.dataclass(frozen=True)
class Block:
    """One overlapping block of a volume: its grid index, the region it covers (core plus halo, clipped
    to the volume) and where its core sits inside it."""

    index: tuple[int, int, int]
    start: tuple[int, int, int]  # region start in volume coordinates (inclusive)
    stop: tuple[int, int, int]  # region stop (exclusive)
    core_start: tuple[int, int, int]  # core start in block coordinates
    core_stop: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]


def block_grid(shape: Sequence[int], block: Sequence[int], halo: int) -> list[Block]:
    """Cores tile the volume in steps of `block` (the last one per axis may be smaller); each block adds
    `halo` voxels on every side, clipped at the volume's edge. Cores never overlap; blocks do."""
    if any(b < 1 for b in block) or halo < 0:
        raise GeometryError(f"block {tuple(block)} and halo {halo}: block sizes >= 1, halo >= 0")
    counts = [math.ceil(n / b) for n, b in zip(shape, block)]
    out = []
    for index in np.ndindex(*counts):
        core = [(i * b, min((i + 1) * b, n)) for i, b, n in zip(index, block, shape)]
        start = tuple(max(0, a - halo) for a, _ in core)
        stop = tuple(min(n, b + halo) for (_, b), n in zip(core, shape))
        out.append(
            Block(
                index=tuple(int(i) for i in index),  # type: ignore[arg-type]
                start=start,  # type: ignore[arg-type]
                stop=stop,  # type: ignore[arg-type]
                core_start=tuple(a - s for (a, _), s in zip(core, start)),  # type: ignore[arg-type]
                core_stop=tuple(b - s for (_, b), s in zip(core, start)),  # type: ignore[arg-type]
            )
        )
    return out


def iter_blocks(volume: np.ndarray, block: Sequence[int], halo: int) -> Iterator[tuple[Block, np.ndarray]]:
    """``(Block, view)`` for every block: views into `volume`, so a block costs memory only when copied."""
    for b in block_grid(volume.shape, block, halo):
        yield b, volume[b.slices]


def _pad_to(volume: np.ndarray, shape: Sequence[int], value: float) -> np.ndarray:
    pads = [(0, max(0, s - n)) for n, s in zip(volume.shape, shape)]
    return np.pad(volume, pads, constant_values=value) if any(p for _, p in pads) else volume


def sliding_window(
    volume: np.ndarray,
    predict_fn: Callable[[np.ndarray], np.ndarray],
    patch: Sequence[int],
    overlap: float = 0.5,
) -> np.ndarray:
    """Foreground probability [D, H, W] of a volume of any size from a patch predictor.

    Windows of `patch` step by ``patch * (1 - overlap)`` (the last one flush with the end); probabilities
    of overlapping windows are averaged. Volumes smaller than a window are padded with their minimum.
    `predict_fn` maps [1, pd, ph, pw, 1] float32 to [1, pd, ph, pw] probabilities.
    """
    shape = volume.shape
    padded = _pad_to(volume, [max(n, p) for n, p in zip(shape, patch)], float(volume.min()))
    total = np.zeros(padded.shape, np.float32)
    count = np.zeros(padded.shape, np.float32)
    starts = []
    for n, p in zip(padded.shape, patch):
        step = max(1, int(p * (1 - overlap)))
        axis = list(range(0, n - p + 1, step))
        if axis[-1] != n - p:
            axis.append(n - p)
        starts.append(axis)
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                window = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
                prob = predict_fn(padded[window][None, ..., None].astype(np.float32))
                total[window] += np.asarray(prob)[0]
                count[window] += 1.0
    return (total / count)[: shape[0], : shape[1], : shape[2]]
