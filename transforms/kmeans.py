"""k-means as Beam combines: the vector-quantised codebooks of the omni path (audio frames, image patches).

    blocks: (key, rows [n, d]) ──SampleRows──> the `sample_size` rows with the smallest keys
        ──Init──> k-means++ seeds (numpy, seeded)
        ──Lloyd 1..N──> each step: every block paired with the previous centroids (a side input), a
                        CombineGlobally(`LloydStep`) that assigns each row to its nearest centroid and
                        sums the rows and counts per centroid (accumulators merge by addition), then
                        the division (the new centroids)

(A CombineFn with the centroids as its own side input would be shorter, but Beam's FnApiRunner cannot
lift such a combine: it fails building the stages.)

The sample is deterministic: every row gets a pseudo-random key from its block's key and the seed, and
the combine keeps the smallest (`SmallestKeys`), so the same data give the same seeds on any runner and
any bundling. A centroid that no row chose keeps its place (as scikit-learn's Lloyd does not: it
relocates it; keeping it makes the step a pure function of the sums, equal to the numpy reference).
Sums are exact (fixed-point integers, see `_SCALE`), so the order in which a runner merges accumulators
does not change the codebook.
"""

from __future__ import annotations

import hashlib

import apache_beam as beam
import numpy as np

__all__ = ["KMeans", "LloydStep", "SmallestKeys", "assign", "kmeans_plus_plus"]

_CHUNK = 4096  # rows per distance computation: bounds the [rows, k] matrix
# Rows are summed as integers in units of 2^-32 (exact for float32 values of magnitude >= 2^-9, and
# within 2^-33 below): integer sums do not depend on the order a runner merges accumulators in, so the
# codebook is the same, bit for bit, on every runner (float sums differed in the last bits between the
# in-process runner and Flink, and a row at a near-tie then took another code).
_SCALE = 2.0**32


def assign(rows: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest centroid [n] int64, its squared distance [n] float64); ties go to the lower
    index.

    Distances come from one matrix product (``|x|^2 - 2 x.c + |c|^2``), whose rounding depends on the
    BLAS kernel and its threads: the same row got another code in Flink's SDK harness than in process.
    So every centroid within a rounding tolerance of the best is compared again by its exact squared
    difference (elementwise, the same arithmetic everywhere): the answer does not depend on the BLAS."""
    rows = np.asarray(rows, np.float64)
    centroids = np.asarray(centroids, np.float64)
    codes = np.zeros(len(rows), np.int64)
    dist = np.zeros(len(rows))
    c2 = np.sum(centroids**2, axis=1)
    for start in range(0, len(rows), _CHUNK):
        x = rows[start : start + _CHUNK]
        x2 = np.sum(x**2, axis=1, keepdims=True)
        d2 = x2 - 2.0 * x @ centroids.T + c2  # [n, k]
        best = d2.min(axis=1, keepdims=True)
        near = d2 <= best + 1e-9 * (x2 + c2.max()) + 1e-12  # well above the product's rounding error
        chunk_codes = np.argmin(d2, axis=1)
        chunk_dist = np.maximum(d2[np.arange(len(x)), chunk_codes], 0.0)
        for i in np.flatnonzero(near.sum(axis=1) > 1):
            candidates = np.flatnonzero(near[i])
            exact = np.sum((centroids[candidates] - x[i]) ** 2, axis=1)
            j = int(np.argmin(exact))  # the first of equal ones: the lower index
            chunk_codes[i], chunk_dist[i] = candidates[j], exact[j]
        codes[start : start + len(x)] = chunk_codes
        dist[start : start + len(x)] = chunk_dist
    return codes, dist


def kmeans_plus_plus(sample: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means++ seeds (Arthur & Vassilvitskii 2007) [min(k, distinct rows), d] float64 from `sample`:
    the first uniformly, each next with probability proportional to its squared distance to the nearest
    seed so far."""
    x = np.asarray(sample, np.float64)
    if len(x) == 0:
        return np.zeros((0, x.shape[1] if x.ndim == 2 else 0))
    rng = np.random.default_rng(seed)
    seeds = [x[rng.integers(len(x))]]
    nearest = np.sum((x - seeds[0]) ** 2, axis=1)
    while len(seeds) < k:
        total = nearest.sum()
        if total <= 0:  # every row coincides with a seed: fewer distinct rows than k
            break
        chosen = x[rng.choice(len(x), p=nearest / total)]
        seeds.append(chosen)
        nearest = np.minimum(nearest, np.sum((x - chosen) ** 2, axis=1))
    return np.stack(seeds)


def _row_keys(key: str, n: int, seed: int) -> np.ndarray:
    digest = hashlib.sha1(f"{seed}/{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big")).random(n)


class SmallestKeys(beam.CombineFn):
    """(keys [n], rows [n, d]) -> the `size` rows with the smallest keys, in key order."""

    def __init__(self, size: int):
        self._size = size

    def create_accumulator(self):
        return None

    def _trim(self, keys, rows):
        if len(keys) > self._size:
            keep = np.argpartition(keys, self._size - 1)[: self._size]
            keys, rows = keys[keep], rows[keep]
        return keys, rows

    def add_input(self, acc, element):
        keys, rows = element
        if acc is not None:
            keys, rows = np.concatenate([acc[0], keys]), np.concatenate([acc[1], rows])
        return self._trim(np.asarray(keys), np.asarray(rows))

    def merge_accumulators(self, accs):
        accs = [a for a in accs if a is not None]
        if not accs:
            return None
        return self._trim(np.concatenate([a[0] for a in accs]), np.concatenate([a[1] for a in accs]))

    def extract_output(self, acc):
        if acc is None:
            return None
        keys, rows = acc
        return rows[np.argsort(keys, kind="stable")]


class LloydStep(beam.CombineFn):
    """The reduction of one Lloyd iteration: ``(rows [n, d], centroids [k, d])`` pairs (every block with
    the previous centroids, attached by a Map with them as a side input, which a runner fuses with the
    combine's first phase: the centroids are not copied per block) -> ``(per-centroid sums [k, d],
    counts [k], inertia)``, the inertia being the sum of squared distances to the previous centroids.
    Accumulators merge by addition, so the combine is lifted (partial sums before the shuffle)."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, element):
        block, centroids = element
        block = np.asarray(block, np.float64)
        if len(centroids) == 0 or len(block) == 0:
            return acc
        codes, dist = assign(block, centroids)
        fixed = np.round(block * _SCALE).astype(np.int64)  # exact integers: sums in any order agree
        sums = np.zeros((len(centroids), block.shape[1]), np.int64)
        np.add.at(sums, codes, fixed)
        counts = np.bincount(codes, minlength=len(centroids))
        sums = sums.astype(object)  # Python integers from here: no overflow however many rows
        if acc is None:
            return sums, counts, float(dist.sum())
        return acc[0] + sums, acc[1] + counts, acc[2] + float(dist.sum())

    def merge_accumulators(self, accs):
        accs = [a for a in accs if a is not None]
        if not accs:
            return None
        sums, counts, inertia = accs[0]
        for s, c, i in accs[1:]:
            sums, counts, inertia = sums + s, counts + c, inertia + i
        return sums, counts, inertia

    def extract_output(self, acc):
        return acc


def _with_centroids(block, state):
    return block, state["centroids"]


def _update(totals, state) -> dict:
    """The next state: each centroid the mean of its rows (one no row chose stays where it was)."""
    if totals is None:
        return state
    sums, counts, inertia = totals
    centroids = np.array(state["centroids"], np.float64)
    for j in np.flatnonzero(counts > 0):  # Python's int / int: the correctly rounded quotient
        centroids[j] = [float(total / int(counts[j])) / _SCALE for total in sums[j]]
    return {"centroids": centroids, "inertia": [*state["inertia"], inertia], "init": state["init"]}


def _keyed(element, seed: int):
    key, rows = element
    rows = np.asarray(rows, np.float32)
    return _row_keys(key, len(rows), seed), rows


def _init(sample, k: int, dim: int, seed: int) -> dict:
    rows = np.zeros((0, dim)) if sample is None else sample
    seeds = kmeans_plus_plus(rows, k, seed)
    return {"centroids": seeds, "inertia": [], "init": seeds}


@beam.ptransform_fn
def KMeans(blocks, *, k: int, dim: int, iterations: int = 10, sample_size: int = 20_000, seed: int = 0):
    """``(key, rows [n, dim])`` -> one ``{"centroids": [k', dim] float64, "init": the k-means++ seeds,
    "inertia": per step}`` (k' < k when the data hold fewer distinct rows; 0 when there are none)."""
    rows = blocks | "Rows" >> beam.Map(lambda kv: kv[1])
    sample = (
        blocks
        | "KeyRows" >> beam.Map(_keyed, seed)
        | "SampleRows" >> beam.CombineGlobally(SmallestKeys(sample_size))
    )
    state = sample | "Init" >> beam.Map(_init, k, dim, seed)
    for i in range(iterations):
        step = f"Lloyd{i + 1}"
        previous = beam.pvalue.AsSingleton(state)
        totals = (
            rows
            | f"{step}Attach" >> beam.Map(_with_centroids, previous)
            | f"{step}Sums" >> beam.CombineGlobally(LloydStep())
        )
        state = totals | f"{step}Update" >> beam.Map(_update, previous)
    return state
