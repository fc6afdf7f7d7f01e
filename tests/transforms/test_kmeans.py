"""k-means as Beam combines: the same seeds on any bundling, and the same centroids as numpy's Lloyd."""

from __future__ import annotations

import itertools
import os
import pickle
import tempfile

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from headrace.transforms.kmeans import KMeans, assign, kmeans_plus_plus

from .kmeans_reference import lloyd


def _blocks(seed: int = 0, blocks: int = 12) -> list[tuple[str, np.ndarray]]:
    """Rows from five Gaussian blobs in 6 dimensions, in blocks of uneven sizes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, size=(5, 6))
    out = []
    for b in range(blocks):
        n = int(rng.integers(3, 60))
        out.append(
            (f"block{b:02d}", (centres[rng.integers(5, size=n)] + rng.normal(size=(n, 6))).astype(np.float32))
        )
    return out


def _save(state, path: str) -> None:
    with open(path, "wb") as f:
        pickle.dump(state, f)


def _run(blocks, **kwargs) -> dict:
    """The KMeans output of one in-process pipeline run (written to a file: DoFns run on copies)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pickle")
        with beam.Pipeline(runner=FnApiRunner()) as p:
            p | beam.Create(blocks, reshuffle=False) | KMeans(dim=6, **kwargs) | beam.Map(_save, path)
        with open(path, "rb") as f:
            return pickle.load(f)


def test_the_beam_combine_equals_numpy_lloyd_from_the_same_seeds():
    blocks = _blocks()
    state = _run(blocks, k=8, iterations=6, sample_size=200, seed=1)
    rows = np.concatenate([b for _, b in blocks])
    centroids, inertia = lloyd(rows, state["init"], 6)
    np.testing.assert_allclose(state["centroids"], centroids, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(state["inertia"], inertia, rtol=1e-9)
    assert all(a >= b for a, b in itertools.pairwise(inertia))  # Lloyd never raises the inertia
    assert inertia[-1] < 0.8 * inertia[0]


def test_seeds_and_codebook_do_not_depend_on_the_order_or_bundling_of_the_blocks():
    blocks = _blocks(seed=3)
    a = _run(blocks, k=5, iterations=3, sample_size=50, seed=7)
    b = _run(blocks[::-1], k=5, iterations=3, sample_size=50, seed=7)
    np.testing.assert_array_equal(a["init"], b["init"])
    np.testing.assert_array_equal(a["centroids"], b["centroids"])  # bit for bit: the sums are exact
    c = _run(blocks, k=5, iterations=3, sample_size=50, seed=8)
    assert not np.array_equal(a["init"], c["init"])  # the seed matters


def test_kmeans_plus_plus_seeds_are_distinct_rows_and_stop_at_the_distinct_count():
    rows = np.repeat(np.arange(12, dtype=np.float64).reshape(4, 3), 5, axis=0)  # 4 distinct rows, 20 rows
    seeds = kmeans_plus_plus(rows, 10, seed=0)
    assert len(seeds) == 4 and len({tuple(s) for s in seeds}) == 4
    assert all(any(np.array_equal(s, r) for r in rows) for s in seeds)
    assert kmeans_plus_plus(np.zeros((0, 3)), 4).shape == (0, 3)


def test_no_rows_give_an_empty_codebook():
    state = _run([], k=4, iterations=2)
    assert state["centroids"].shape == (0, 6) and state["inertia"] == []


@pytest.mark.parametrize("n", [1, 5000])  # below and above the chunk the distances are computed in
def test_assign_is_the_nearest_centroid(n):
    rng = np.random.default_rng(n)
    rows, centroids = rng.normal(size=(n, 4)), rng.normal(size=(9, 4))
    codes, dist = assign(rows, centroids)
    d2 = ((rows[:, None] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(codes, d2.argmin(1))
    np.testing.assert_allclose(dist, d2.min(1), atol=1e-9)
