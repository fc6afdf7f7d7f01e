"""A plain numpy implementation of the EM in headrace.transforms.crowd_em, written from the equations.

Dense arrays over all annotations at once, bincount for every sum: no chunks, buckets or Beam. The tests
compare the Beam pipeline with it to 1e-6, and bench/crowd_em.py uses it as the "vectorised numpy EM"
baseline. It shares no code with the library on purpose (only the tau grid, part of the model's
definition, is restated here).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy.special import gammaln

TAU_GRID = np.logspace(-1, 5, 61)


@dataclasses.dataclass
class Data:
    tasks: np.ndarray  # task names, in code order
    classes: list[str]
    workers: np.ndarray  # worker names, in code order
    t: np.ndarray  # [m] task code
    w: np.ndarray  # [m] worker code
    y: np.ndarray  # [m] label code
    groups: np.ndarray | None = None  # [W] group code


def load(annotations_csv: str, annotators_csv: str | None = None) -> Data:
    """Reads a clean annotations file (and groups) with pandas; duplicates keep the first row."""
    df = pd.read_csv(annotations_csv, dtype=str, keep_default_na=False)
    df = df[(df.task != "") & (df.worker != "") & (df.label != "")]
    df = df.drop_duplicates(subset=["task", "worker"], keep="first")
    classes = sorted(df.label.unique())
    tasks, t = np.unique(df.task.to_numpy(), return_inverse=True)
    workers, w = np.unique(df.worker.to_numpy(), return_inverse=True)
    y = np.searchsorted(np.array(classes, dtype=object), df.label.to_numpy())
    groups = None
    if annotators_csv:
        g = pd.read_csv(annotators_csv, dtype=str, keep_default_na=False).drop_duplicates("worker")
        table = dict(zip(g.worker, g.group))
        names = sorted(set(table.values()))
        if any(x not in table for x in workers):
            names.append("unknown")
        index = {n: i for i, n in enumerate(names)}
        groups = np.array([index[table.get(x, "unknown")] for x in workers])
    return Data(tasks, classes, workers, t, w, y, groups)


def majority(d: Data) -> np.ndarray:
    K, T = len(d.classes), len(d.tasks)
    votes = np.bincount(d.t * K + d.y, minlength=T * K).reshape(T, K)
    return votes / votes.sum(1, keepdims=True)


def _counts(d: Data, q: np.ndarray) -> np.ndarray:
    """n[w, k, l] = sum over annotations (t, w, l) of q[t, k]."""
    K, W = q.shape[1], len(d.workers)
    n = np.zeros((W, K, K))
    for k in range(K):
        n[:, k, :] = np.bincount(d.w * K + d.y, weights=q[d.t, k], minlength=W * K).reshape(W, K)
    return n


def _dirmult_loglik(n: np.ndarray, G: np.ndarray, tau: float) -> float:
    a = tau * G
    return float(np.sum(gammaln(tau) - gammaln(n.sum(-1) + tau)) + np.sum(gammaln(n + a) - gammaln(a)))


def _best_tau(values: np.ndarray) -> float:
    i = int(np.argmax(values))
    if i in (0, len(values) - 1):
        return float(TAU_GRID[i])
    x, y = np.log(TAU_GRID[i - 1 : i + 2]), values[i - 1 : i + 2]
    c2, c1, _ = np.polyfit(x, y, 2)
    if c2 >= 0:
        return float(TAU_GRID[i])
    return float(np.exp(np.clip(-c1 / (2 * c2), x[0], x[2])))


def m_step(d: Data, q: np.ndarray, method: str, alpha: float, fixed_tau: float | None = None, estimate=False):
    K = q.shape[1]
    n = _counts(d, q)
    prior = (q.sum(0) + alpha) / (len(q) + K * alpha)
    if method == "dawid_skene":
        pi = (n + alpha) / (n.sum(-1, keepdims=True) + K * alpha)
        return np.log(prior), np.log(pi), None, None
    n_groups = int(d.groups.max()) + 1
    G = np.zeros((n_groups, K, K))
    tau = np.zeros(n_groups)
    for g in range(n_groups):
        members = d.groups == g
        N = n[members].sum(0)
        G[g] = (N + alpha) / (N.sum(-1, keepdims=True) + K * alpha)
        if estimate:
            tau[g] = _best_tau(np.array([_dirmult_loglik(n[members], G[g], s) for s in TAU_GRID]))
        else:
            tau[g] = K if fixed_tau is None else fixed_tau
    Gw, tw = G[d.groups], tau[d.groups][:, None, None]
    pi = (n + tw * Gw + alpha) / (n.sum(-1, keepdims=True) + tw + K * alpha)
    return np.log(prior), np.log(pi), G, tau


def e_step(d: Data, log_prior: np.ndarray, log_pi: np.ndarray):
    K, T = len(log_prior), len(d.tasks)
    scores = np.tile(log_prior, (T, 1))
    for k in range(K):
        scores[:, k] += np.bincount(d.t, weights=log_pi[d.w, k, d.y], minlength=T)
    top = scores.max(1, keepdims=True)
    log_z = top + np.log(np.exp(scores - top).sum(1, keepdims=True))
    return np.exp(scores - log_z), float(log_z.sum())


def run(d: Data, method: str, iterations: int, tolerance: float, alpha=0.01, fixed_tau=None, estimate=False):
    """The same schedule as the pipeline: M(MV), then N x (E, M), stopping early on the tolerance."""
    q = majority(d)
    if method == "majority_vote":
        return {"q": q, "log_likelihood": [], "iterations": 0}
    history = []
    params = m_step(d, q, method, alpha, fixed_tau, estimate)
    converged = False
    for _ in range(iterations):
        q, ll = e_step(d, params[0], params[1])
        history.append(ll)
        params = m_step(d, q, method, alpha, fixed_tau, estimate)
        if len(history) >= 2 and abs(history[-1] - history[-2]) <= tolerance * abs(history[-1]):
            converged = True
            break
    q, _ = e_step(d, params[0], params[1])
    return {
        "q": q,
        "log_likelihood": history,
        "iterations": len(history),
        "converged": converged,
        "group_matrix": params[2],
        "group_strength": params[3],
    }
