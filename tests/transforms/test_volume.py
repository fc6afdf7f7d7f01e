"""Orientation, resampling and blocks of `headrace.transforms.volume` against direct constructions."""

from __future__ import annotations

import numpy as np
import pytest

from headrace.transforms.volume import (
    GeometryError,
    block_grid,
    canonical_axes,
    reorient,
    resample,
    sliding_window,
)


def test_reorient_undoes_any_axis_permutation_and_flip():
    rng = np.random.default_rng(0)
    canonical = rng.normal(size=(4, 5, 6)).astype(np.float32)  # [D(S), H(P), W(L)]
    lps = np.eye(3)[[2, 1, 0]]  # rows: directions of D, H, W in LPS (z, y, x)
    for perm in [(0, 1, 2), (2, 0, 1), (1, 2, 0), (2, 1, 0)]:
        for flips in [(False, False, False), (True, False, True), (False, True, False)]:
            stored, directions = canonical, lps.copy()
            for axis, flip in enumerate(flips):
                if flip:
                    stored = np.flip(stored, axis)
                    directions[axis] *= -1
            stored = np.transpose(stored, perm)
            directions = directions[list(perm)] * [[1.0], [2.0], [0.5]]  # lengths do not matter
            spacing = np.array([3.0, 1.0, 0.5])[list(perm)]
            got, got_spacing = reorient(stored, spacing, directions)
            np.testing.assert_array_equal(got, canonical)
            assert got_spacing == (3.0, 1.0, 0.5)


def test_oblique_grid_goes_to_the_closest_axes_and_degenerate_ones_fail():
    tilt = np.array([[0.1, 0.05, 0.99], [0.0, 0.98, -0.2], [0.97, 0.0, 0.1]])  # D~z, H~y, W~x
    assert canonical_axes(tilt) == ((0, 1, 2), (False, False, False))
    with pytest.raises(GeometryError, match="same patient axis"):
        canonical_axes(np.array([[0, 0, 1.0], [0, 0.1, 0.9], [1.0, 0, 0]]))


def test_resample_to_the_same_spacing_is_the_identity():
    volume = np.random.default_rng(1).normal(size=(3, 7, 5)).astype(np.float32)
    np.testing.assert_array_equal(resample(volume, (2, 1, 1), (2, 1, 1)), volume)
    labels = (volume > 0).astype(np.uint8)
    np.testing.assert_array_equal(resample(labels, (2, 1, 1), (2, 1, 1), order=0), labels)
    assert resample(volume[:1], (2, 1, 1), (1, 1, 1)).shape == (2, 7, 5)  # a single slice is repeated


@pytest.mark.parametrize("block,halo", [((4, 4, 4), 0), ((3, 5, 7), 2), ((2, 2, 2), 5), ((20, 20, 20), 1)])
def test_block_cores_partition_the_volume(block, halo):
    shape = (9, 10, 11)
    owner = np.zeros(shape, np.int32)
    for b in block_grid(shape, block, halo):
        core = tuple(slice(s + a, s + c) for s, a, c in zip(b.start, b.core_start, b.core_stop))
        owner[core] += 1
        for s, e, n, a, c in zip(b.start, b.stop, shape, b.core_start, b.core_stop):
            assert 0 <= s < e <= n and a == min(halo, s + a) and e - (s + c) == min(halo, n - (s + c))
    assert (owner == 1).all()


@pytest.mark.parametrize(
    "shape,patch", [((9, 20, 13), (4, 8, 8)), ((3, 5, 6), (4, 8, 8)), ((8, 8, 8), (8, 8, 8))]
)
def test_sliding_window_covers_every_voxel_once_averaged(shape, patch):
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    calls = []

    def pointwise(window):
        calls.append(window.shape)
        return 1 / (1 + np.exp(-window[..., 0]))

    got = sliding_window(volume, pointwise, patch, overlap=0.5)
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-volume)), rtol=1e-6)
    assert all(c == (1, *patch, 1) for c in calls)
