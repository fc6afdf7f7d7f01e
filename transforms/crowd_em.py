r"""EM for crowdsourced labels (majority vote, Dawid-Skene, GroupAnno) as numpy steps and Beam DoFns.

Notation: tasks t with unknown true class z_t in {1..K}; workers j, each in a group g(j); annotation
(t, j, l) says worker j gave task t the label l. q_t(k) = P(z_t = k | data) is the posterior.

Dawid-Skene (1979). Worker j has a confusion matrix pi_j[k, l] = P(j says l | z = k); classes have
priors p_k.
  E-step:  log q_t(k) = log p_k + sum_{(t,j,l)} log pi_j[k, l] - log Z_t
           log-likelihood LL = sum_t log Z_t
  M-step:  n_j[k, l] = sum_{(t,j,l)} q_t(k)                     (expected counts, per worker)
           p_k = (sum_t q_t(k) + a) / (T + K a)
           pi_j[k, l] = (n_j[k, l] + a) / (n_j[k, .] + K a)      (a: smoothing, never a zero probability)
  Initialised from majority vote: q_t(k) = share of task t's labels that are k.

GroupAnno (annotator group bias; Liu et al., ACL 2022), written here as a hierarchical Dawid-Skene.
Every group has a confusion matrix G_g, the bias its members share; a worker's matrix is drawn around
it, each row from a Dirichlet with mean G_g[k, .] and concentration tau_g:
      pi_j[k, .] ~ Dirichlet(tau_g G_g[k, .]),   j in group g
so tau_g measures how strongly the group's members agree, and pi_j - G_g is worker j's deviation.
The extended EM estimates both, with the same E-step, and an M-step in three parts:
  group bias:  N_g = sum_{j in g} n_j;   G_g[k, l] = (N_g[k, l] + a) / (N_g[k, .] + K a)
  strength:    tau_g = K by default: the group prior is worth one pseudo-label per cell of a row.
               Optionally estimated by empirical Bayes, tau_g = argmax_tau sum_{j in g} sum_k
               log DirMult(n_j[k, .] | tau G_g[k, .]) on a log grid with parabolic refinement.
  workers:     pi_j[k, l] = (n_j[k, l] + tau_g G_g[k, l] + a) / (n_j[k, .] + tau_g + K a)   (the MAP)
A worker's row k is pulled to its group's row with weight tau_g / (n_j[k, .] + tau_g): pooling through
the group is what beats per-worker Dawid-Skene when labels per worker are sparse (with K = 3, a worker
with 2 labels in a row takes 60% of it from the group), while a worker with many labels keeps its own
estimate (3% at 100 labels), so with one group the model reduces to Dawid-Skene. Why tau = K and not the
empirical-Bayes estimate by default: on planted data with one group (worker rows drawn with
concentration 30, ~100 labels per row) the estimate is accurate (39) but pulls experienced workers 28%
toward the group; labels then differ from Dawid-Skene on 3.6% of tasks and are less accurate (0.885 vs
0.891), whereas tau = K agrees on 99.3% (tests/pipelines/test_crowd.py). With sparse labels the estimate
pools harder and wins more (0.878 vs 0.858 for tau = K, Dawid-Skene 0.734): `estimate_group_strength`.

Data layout: tasks are processed in `Chunk`s, CSR arrays over annotations (no Python object per
annotation). Sufficient statistics of an M-step are per-worker count matrices, combined by worker bucket
(``worker % buckets``) with a keyed combine, then per group.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math

import apache_beam as beam
import numpy as np
from scipy.special import gammaln

from headrace.transforms.counting import Fixed

__all__ = [
    "SENTINEL",
    "TAU_GRID",
    "Chunk",
    "ChunkRef",
    "EMSettings",
    "EMStep",
    "Params",
    "Stats",
    "StatsFn",
    "build_chunk",
    "collect_stats",
    "dawid_skene_pi",
    "derive_params",
    "e_step",
    "expected_counts",
    "group_matrices",
    "groupanno_pi",
    "load_chunk",
    "log_prior",
    "majority_posteriors",
    "store_chunk",
    "strength_from_grid",
    "strength_loglik",
]

# Candidate group strengths: 0.1 .. 1e5, ten points per decade.
TAU_GRID = np.logspace(-1, 5, 61)


@dataclasses.dataclass
class Chunk:
    """A set of tasks with all their (deduplicated) annotations, as CSR arrays."""

    id: int
    offsets: np.ndarray  # int64 [n_tasks + 1]: annotations of task i are offsets[i]:offsets[i+1]
    task_index: np.ndarray  # int32 [m]: the task (row) of each annotation
    workers: np.ndarray  # int32 [m]: global worker index
    labels: np.ndarray  # int32 [m]: class index
    uniq: np.ndarray  # int32 [u]: distinct workers of the chunk, sorted
    local: np.ndarray  # int32 [m]: index of each annotation's worker in `uniq`
    num_classes: int = 0
    # Per-task log prior [n_tasks, K] (classifier feedback); None: the global class prior.
    log_prior: np.ndarray | None = None
    # Precomputed flat indices (the E-step's gather and the M-step's bincounts use them every iteration):
    worker_label: np.ndarray | None = None  # int32 [m]: workers * K + labels
    local_label: np.ndarray | None = None  # int32 [m]: local * K + labels

    @property
    def num_tasks(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_annotations(self) -> int:
        return len(self.workers)


def build_chunk(
    chunk_id: int,
    task_codes: np.ndarray,
    workers: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    log_prior=None,
) -> Chunk:
    """A chunk from annotations sorted by task (`task_codes` non-decreasing, 0..n_tasks-1)."""
    task_codes = np.asarray(task_codes, dtype=np.int64)
    n_tasks = int(task_codes[-1]) + 1 if len(task_codes) else 0
    counts = np.bincount(task_codes, minlength=n_tasks)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    uniq, local = np.unique(workers, return_inverse=True)
    labels = np.asarray(labels, dtype=np.int64)
    return Chunk(
        id=chunk_id,
        offsets=offsets,
        task_index=task_codes.astype(np.int32),
        workers=np.asarray(workers, dtype=np.int32),
        labels=labels.astype(np.int32),
        uniq=uniq.astype(np.int32),
        local=local.astype(np.int32),
        num_classes=num_classes,
        log_prior=log_prior,
        worker_label=(np.asarray(workers, dtype=np.int64) * num_classes + labels).astype(np.int32),
        local_label=(local.astype(np.int64) * num_classes + labels).astype(np.int32),
    )


@dataclasses.dataclass(frozen=True)
class ChunkRef:
    """Where a chunk's arrays are stored; what flows through the EM iterations instead of the arrays."""

    id: int
    path: str
    num_tasks: int
    num_annotations: int


_ARRAYS = ("offsets", "task_index", "workers", "labels", "uniq", "local", "worker_label", "local_label")


def store_chunk(chunk: Chunk, directory: str) -> ChunkRef:
    """Writes the chunk's arrays as .npy files under `directory`/chunk-ID/ (any Beam filesystem)."""
    from apache_beam.io.filesystems import FileSystems

    base = f"{directory.rstrip('/')}/chunk-{chunk.id:05d}"
    for name in _ARRAYS:
        buf = io.BytesIO()
        np.save(buf, getattr(chunk, name))
        with FileSystems.create(f"{base}/{name}.npy") as f:
            f.write(buf.getvalue())
    if chunk.log_prior is not None:
        buf = io.BytesIO()
        np.save(buf, chunk.log_prior)
        with FileSystems.create(f"{base}/log_prior.npy") as f:
            f.write(buf.getvalue())
    meta = json.dumps(
        {"id": chunk.id, "num_classes": chunk.num_classes, "log_prior": chunk.log_prior is not None}
    ).encode()
    with FileSystems.create(f"{base}/meta.json") as f:
        f.write(meta)
    return ChunkRef(chunk.id, base, chunk.num_tasks, chunk.num_annotations)


# Chunks already opened in this worker process, by path. Each EM iteration reads every chunk again; on a
# local filesystem the arrays are memory-mapped, so after the first iteration they are served from the
# page cache without a copy (through Beam's data plane they cost ~0.4 s per iteration at 10M
# annotations, measured). A process-level cache of immutable files, like a model cache in RunInference.
_OPEN: dict[str, Chunk] = {}


def load_chunk(ref: ChunkRef) -> Chunk:
    chunk = _OPEN.get(ref.path)
    if chunk is not None:
        return chunk
    from apache_beam.io.filesystems import FileSystems

    local = "://" not in ref.path
    arrays = {}
    for name in _ARRAYS:
        path = f"{ref.path}/{name}.npy"
        if local:
            arrays[name] = np.load(path, mmap_mode="r")
        else:
            with FileSystems.open(path) as f:
                arrays[name] = np.load(io.BytesIO(f.read()))
    with FileSystems.open(f"{ref.path}/meta.json") as f:
        meta = json.loads(f.read())
    if meta["log_prior"]:
        path = f"{ref.path}/log_prior.npy"
        if local:
            arrays["log_prior"] = np.load(path, mmap_mode="r")
        else:
            with FileSystems.open(path) as f:
                arrays["log_prior"] = np.load(io.BytesIO(f.read()))
    chunk = Chunk(id=meta["id"], num_classes=meta["num_classes"], **arrays)
    if len(_OPEN) >= 1024:
        _OPEN.clear()
    _OPEN[ref.path] = chunk
    return chunk


@dataclasses.dataclass
class Params:
    """Model parameters after an M-step, with the run's history (carried between unrolled iterations)."""

    log_prior: np.ndarray  # [K]
    log_pi: np.ndarray  # [W, K, K]: log P(worker says l | true k)
    group_matrix: np.ndarray | None = None  # [G, K, K]
    group_strength: np.ndarray | None = None  # [G]
    iteration: int = 0  # M-steps done after the initial one
    log_likelihood: tuple[float, ...] = ()  # LL of each E-step
    converged: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.log_prior)


def majority_posteriors(chunk: Chunk, num_classes: int) -> np.ndarray:
    """q_t(k) = share of task t's labels equal to k (the EM initialisation and the MV answer)."""
    votes = np.bincount(
        chunk.task_index.astype(np.int64) * num_classes + chunk.labels,
        minlength=chunk.num_tasks * num_classes,
    ).reshape(chunk.num_tasks, num_classes)
    return votes / votes.sum(axis=1, keepdims=True)


def e_step(chunk: Chunk, params: Params) -> tuple[np.ndarray, float]:
    """Posteriors q [n_tasks, K] and the chunk's log-likelihood under `params`."""
    w, k = params.log_pi.shape[0], params.num_classes
    # Rows (worker, given label) of log pi as a [W*K, K] table: one contiguous gather per annotation.
    by_label = np.ascontiguousarray(params.log_pi.transpose(0, 2, 1)).reshape(w * k, k)
    lp = by_label[chunk.worker_label]  # [m, K]
    scores = np.add.reduceat(lp, chunk.offsets[:-1], axis=0) if chunk.num_annotations else lp[:0]
    if chunk.log_prior is None:
        scores = scores + params.log_prior  # [n, K]
    else:  # per-task priors (classifier feedback); tasks without one (NaN rows) keep the class prior
        scores = scores + np.where(np.isnan(chunk.log_prior), params.log_prior, chunk.log_prior)
    top = scores.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(scores - top).sum(axis=1, keepdims=True)) + top  # [n, 1]
    return np.exp(scores - log_z), float(log_z.sum())


def expected_counts(chunk: Chunk, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-worker expected counts n_j[k, l] for the chunk's workers: (uniq [u], counts [u, K, K])."""
    k, u = q.shape[1], len(chunk.uniq)
    counts = np.empty((u, k, k))
    for true in range(k):  # K bincounts over the annotations, no [m, K] index array
        weights = q[:, true][chunk.task_index]
        counts[:, true, :] = np.bincount(chunk.local_label, weights=weights, minlength=u * k).reshape(u, k)
    return chunk.uniq, counts


def dawid_skene_pi(counts: np.ndarray, alpha: float) -> np.ndarray:
    """log pi from expected counts [W, K, K]."""
    k = counts.shape[-1]
    return np.log(counts + alpha) - np.log(counts.sum(axis=-1, keepdims=True) + k * alpha)


def log_prior(prior_counts: np.ndarray, alpha: float) -> np.ndarray:
    k = len(prior_counts)
    return np.log(prior_counts + alpha) - math.log(prior_counts.sum() + k * alpha)


def group_matrices(group_counts: np.ndarray, alpha: float) -> np.ndarray:
    """G_g from pooled counts [G, K, K]."""
    k = group_counts.shape[-1]
    return (group_counts + alpha) / (group_counts.sum(axis=-1, keepdims=True) + k * alpha)


def strength_loglik(counts: np.ndarray, group_matrix: np.ndarray, grid: np.ndarray = TAU_GRID) -> np.ndarray:
    """sum over the given workers and rows of log DirMult(n_j[k,.] | tau G[k,.]) for each tau in `grid`.

    `counts` [W, K, K] are the workers' expected counts, `group_matrix` [W, K, K] their group's G (one
    per worker). Additive over workers, so buckets of workers can be evaluated apart and summed.
    """
    out = np.empty(len(grid))
    row_totals = counts.sum(axis=-1)  # [W, K]
    for i, tau in enumerate(grid):
        a = tau * group_matrix
        out[i] = np.sum(gammaln(tau) - gammaln(row_totals + tau)) + np.sum(gammaln(counts + a) - gammaln(a))
    return out


def strength_from_grid(loglik: np.ndarray, grid: np.ndarray = TAU_GRID) -> float:
    """The maximising tau: the best grid point refined by a parabola through its neighbours (in log tau)."""
    i = int(np.argmax(loglik))
    if i == 0 or i == len(grid) - 1:
        return float(grid[i])
    x = np.log(grid[i - 1 : i + 2])
    y = loglik[i - 1 : i + 2]
    denom = (x[0] - x[1]) * (x[0] - x[2]) * (x[1] - x[2])
    a = (x[2] * (y[1] - y[0]) + x[1] * (y[0] - y[2]) + x[0] * (y[2] - y[1])) / denom
    b = (x[2] ** 2 * (y[0] - y[1]) + x[1] ** 2 * (y[2] - y[0]) + x[0] ** 2 * (y[1] - y[2])) / denom
    if a >= 0:
        return float(grid[i])
    return float(np.exp(np.clip(-b / (2 * a), x[0], x[2])))


def groupanno_pi(
    counts: np.ndarray, group_matrix: np.ndarray, strength: np.ndarray, alpha: float
) -> np.ndarray:
    """log pi_j, the MAP under each worker's group prior; `group_matrix` [W,K,K], `strength` [W]."""
    k = counts.shape[-1]
    tau = strength[:, None, None]
    num = counts + tau * group_matrix + alpha
    den = counts.sum(axis=-1, keepdims=True) + tau + k * alpha
    return np.log(num) - np.log(den)


# -------------------------------------------------------------------------------------------------
# Statistics, and the parameters derived from them
# -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stats:
    """Sufficient statistics of one E-step, combined over all chunks, plus the run's history."""

    workers: np.ndarray  # [W, K, K] expected counts n_j
    groups: np.ndarray  # [G, K, K] pooled counts N_g
    prior: np.ndarray  # [K] expected class counts
    loglik: float | None  # LL of the E-step that produced them (None for the majority-vote start)
    history: tuple[float, ...]  # LL of the E-steps before it


@dataclasses.dataclass(frozen=True)
class EMSettings:
    method: str  # dawid_skene | groupanno
    smoothing: float
    tolerance: float
    group_strength: float | None  # tau; None: the number of classes
    estimate_group_strength: bool  # empirical Bayes instead of the fixed tau
    buckets: int


def derive_params(stats: Stats, worker_groups: np.ndarray, settings: EMSettings) -> Params:
    """The M-step: parameters from combined statistics (see the module docstring)."""
    a = settings.smoothing
    history = stats.history if stats.loglik is None else (*stats.history, stats.loglik)
    converged = len(history) >= 2 and abs(history[-1] - history[-2]) <= settings.tolerance * abs(history[-1])
    gm = gs = None
    if settings.method == "groupanno":
        gm = group_matrices(stats.groups, a)
        if settings.estimate_group_strength:
            gs = np.empty(len(gm))
            for g in range(len(gm)):
                members = stats.workers[worker_groups == g]
                gs[g] = strength_from_grid(strength_loglik(members, np.broadcast_to(gm[g], members.shape)))
        else:
            tau = settings.group_strength if settings.group_strength is not None else gm.shape[-1]
            gs = np.full(len(gm), float(tau))
        log_pi = groupanno_pi(stats.workers, gm[worker_groups], gs[worker_groups], a)
    else:
        log_pi = dawid_skene_pi(stats.workers, a)
    return Params(log_prior(stats.prior, a), log_pi, gm, gs, len(history), history, converged)


# -------------------------------------------------------------------------------------------------
# Beam steps of one EM iteration: an E-step ParDo and one keyed combine
# -------------------------------------------------------------------------------------------------

SENTINEL = "carry"  # one extra element among the chunks: it carries the history through each iteration


def _stats_elements(chunk: Chunk, q: np.ndarray, worker_groups: np.ndarray, buckets: int):
    uniq, counts = expected_counts(chunk, q)
    bucket = uniq % buckets
    for b in np.unique(bucket):
        sel = bucket == b
        yield ("w", int(b)), ("w", (uniq[sel] // buckets, counts[sel]))
    groups = worker_groups[uniq]
    for g in np.unique(groups):
        yield ("g", int(g)), ("sum", counts[groups == g].sum(axis=0))
    yield ("prior", 0), ("sum", q.sum(axis=0))


class StatsFn(beam.CombineFn):
    """The keyed combine of an M-step. Keys: ("w", bucket) per-worker counts (dense per bucket),
    ("g", group) pooled counts, ("prior", 0) class counts, ("ll", 0) log-likelihood, ("hist", 0) history.
    Values are (kind, payload) with kind "w" (local indices, counts), "sum" (added), "dense" (added; what
    a previous M-step gave) or "first" (kept). Sums are `Fixed`: the same bits in any combining order, so
    a run on a cluster writes what the in-process runner writes."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, value):
        kind, payload = value
        if kind == "first":
            return acc if acc is not None else value
        if kind == "w":
            value = ("dense", Fixed.of(_dense(payload)))
        else:
            value = ("dense" if kind == "dense" else "sum", Fixed.of(payload))
        return self.merge_accumulators([acc, value])

    def merge_accumulators(self, accs):
        out = None
        for acc in accs:
            if acc is None:
                continue
            if out is None:
                out = acc
            elif out[0] == "sum":
                out = ("sum", out[1] + acc[1])
            elif out[0] == "dense":
                rows = max(len(out[1].whole), len(acc[1].whole))
                out = ("dense", out[1].padded(rows) + acc[1].padded(rows))
        return out

    def extract_output(self, acc):
        if acc is None or acc[0] == "first":
            return acc
        value = acc[1].to_float()
        return (acc[0], value if value.ndim else float(value))


def _dense(local_counts):
    idx, counts = local_counts
    out = np.zeros((int(idx.max()) + 1, *counts.shape[1:]))
    out[idx] = counts  # indices are distinct within a chunk
    return out


def collect_stats(elements, num_workers: int, num_groups: int, num_classes: int, buckets: int) -> Stats:
    """Combined (key, value) elements -> Stats (per-worker counts reassembled from buckets)."""
    k = num_classes
    workers = np.zeros((num_workers, k, k))
    groups = np.zeros((num_groups, k, k))
    prior = np.zeros(k)
    loglik, history = None, ()
    for (kind, key), (_, value) in elements:
        if kind == "w":
            idx = np.arange(len(value)) * buckets + key
            keep = idx < num_workers
            workers[idx[keep]] = value[keep]
        elif kind == "g":
            groups[key] = value
        elif kind == "prior":
            prior = value
        elif kind == "ll":
            loglik = float(value)
        elif kind == "hist":
            history = tuple(value)
    return Stats(workers, groups, prior, loglik, history)


class EMStep(beam.DoFn):
    """One EM iteration over a chunk: derives the parameters from the previous statistics (the M-step's
    normalisation, done once per worker and cached), runs the E-step, and emits keyed statistics.

    The SENTINEL element carries the history. After convergence chunks emit nothing and the sentinel
    re-emits the previous statistics unchanged, so later unrolled iterations are pass-throughs.
    """

    def __init__(self, settings: EMSettings, majority: bool = False):
        self._settings = settings
        self._majority = majority
        self._cache: tuple | None = None
        self._annotations = beam.metrics.Metrics.counter("crowd_em", "annotations_processed")

    def _state(self, prev, vocab) -> tuple[Stats, Params]:
        # Every chunk of an iteration sees the same statistics: derive the parameters once.
        key = (len(prev), _fingerprint(prev))
        if self._cache is None or self._cache[0] != key:
            stats = collect_stats(
                prev,
                len(vocab.worker_groups),
                len(vocab.groups),
                len(vocab.classes),
                self._settings.buckets,
            )
            self._cache = (key, (stats, derive_params(stats, vocab.worker_groups, self._settings)))
        return self._cache[1]

    def process(self, element, vocab, prev=()):
        k = len(vocab.classes)
        if k == 0:  # no usable annotation at all: nothing to estimate
            if isinstance(element, str):
                yield ("hist", 0), ("first", ())
            return
        if self._majority:
            if isinstance(element, str):
                yield ("hist", 0), ("first", ())
                return
            chunk = load_chunk(element)
            q = majority_posteriors(chunk, k)
            yield from _stats_elements(chunk, q, vocab.worker_groups, self._settings.buckets)
            return
        _, params = self._state(prev, vocab)
        if isinstance(element, str):  # the sentinel
            if params.converged:
                yield from prev  # the statistics pass through unchanged
            else:
                yield ("hist", 0), ("first", params.log_likelihood)
            return
        if params.converged:
            return
        chunk = load_chunk(element)
        q, ll = e_step(chunk, params)
        self._annotations.inc(chunk.num_annotations)
        yield from _stats_elements(chunk, q, vocab.worker_groups, self._settings.buckets)
        yield ("ll", 0), ("sum", ll)


def _fingerprint(prev) -> float:
    """A cheap content check of a statistics list (its log-likelihood and prior entries)."""
    total = 0.0
    for (kind, _), (_, value) in prev:
        if kind in ("ll", "prior"):
            total += float(np.sum(value))
    return total
