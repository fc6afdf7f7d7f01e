"""Generated crowdsourcing data with planted annotator group bias, for tests, benchmarks and the demo.

The planted model is GroupAnno's: every group g has a confusion matrix G_g (a distinct bias: it confuses
one class with the next); each worker's rows are drawn from Dirichlet(concentration * G_g[k, .]); each task
has a true class from `class_prior` and is labelled by `labels_per_task` distinct workers. Texts for the
classifier mix words of the true class's topic with common words. Everything is vectorised, so that 10M
annotations are written in seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

__all__ = ["CrowdData", "generate", "group_bias_matrices"]


@dataclasses.dataclass(frozen=True)
class CrowdData:
    annotations: str
    annotators: str
    tasks: str
    truth: str
    group_matrices: np.ndarray  # [G, K, K]
    num_annotations: int


def group_bias_matrices(
    num_groups: int, num_classes: int, accuracy: float = 0.75, bias: float = 0.35
) -> np.ndarray:
    """G_g: right with probability `accuracy`, errors uniform, except the group's blind spot: true class
    c = g mod K is given as the next class c+1 with `bias` more probability (taken from the right one)."""
    k = num_classes
    mats = np.empty((num_groups, k, k))
    for g in range(num_groups):
        m = np.full((k, k), (1 - accuracy) / (k - 1))
        np.fill_diagonal(m, accuracy)
        c = g % k
        m[c, c] -= bias
        m[c, (c + 1) % k] += bias
        mats[g] = m
    return mats


_PLAIN = pcsv.WriteOptions(quoting_style="none")  # ids and labels here never need quoting


def _strings(prefix: str, values: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(values), pa.string()), "")


def generate(
    out_dir: str | Path,
    *,
    num_tasks: int = 2000,
    num_workers: int = 400,
    labels_per_task: int = 5,
    num_classes: int = 3,
    num_groups: int = 3,
    concentration: float = 30.0,
    group_matrices: np.ndarray | None = None,
    class_prior: np.ndarray | None = None,
    with_text: bool = True,
    seed: int = 0,
) -> CrowdData:
    """Writes annotations.csv, annotators.csv, tasks.csv and truth.csv under `out_dir`."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k, w, L = num_classes, num_workers, labels_per_task
    if w < L * 2:
        raise ValueError("labels_per_task must be at most half the number of workers")
    G = group_bias_matrices(num_groups, k) if group_matrices is None else np.asarray(group_matrices)
    prior = np.full(k, 1.0 / k) if class_prior is None else np.asarray(class_prior)
    worker_group = rng.integers(0, len(G), size=w)
    # Worker confusion rows ~ Dirichlet(concentration * G_g[k]) via normalised gammas.
    alpha = concentration * G[worker_group]  # [W, K, K]
    pi = rng.gamma(alpha)
    pi /= pi.sum(axis=2, keepdims=True)
    truth = rng.choice(k, size=num_tasks, p=prior)
    # Distinct workers per task: an arithmetic progression modulo W with a step that cannot wrap onto
    # itself within L steps.
    start = rng.integers(0, w, size=num_tasks)
    step = rng.integers(1, max(2, w // L), size=num_tasks)
    workers = (start[:, None] + np.arange(L)[None, :] * step[:, None]) % w  # [T, L]
    tasks = np.repeat(np.arange(num_tasks), L)
    workers = workers.ravel()
    # Labels: inverse-CDF sampling from each annotation's row pi[worker, truth].
    rows = pi[workers, truth[tasks]]  # [T*L, K]
    u = rng.random(len(tasks))[:, None]
    labels = np.minimum((rows.cumsum(axis=1) < u).sum(axis=1), k - 1)

    class_names = np.array([f"c{c}" for c in range(k)])
    write = lambda table, name: pcsv.write_csv(table, out / name, _PLAIN)
    write(
        pa.table(
            {
                "task": _strings("t", tasks),
                "worker": _strings("w", workers),
                "label": pa.array(class_names[labels]),
            }
        ),
        "annotations.csv",
    )
    write(
        pa.table({"worker": _strings("w", np.arange(w)), "group": _strings("g", worker_group)}),
        "annotators.csv",
    )
    write(
        pa.table({"task": _strings("t", np.arange(num_tasks)), "label": pa.array(class_names[truth])}),
        "truth.csv",
    )
    if with_text:
        topic = [[f"{name}_word{i}" for i in range(25)] for name in class_names]
        common = [f"common{i}" for i in range(200)]
        texts = []
        for t in range(num_tasks):
            n = int(rng.integers(6, 14))
            own = rng.random(n) < 0.45
            words = [topic[truth[t]][rng.integers(25)] if o else common[rng.integers(200)] for o in own]
            texts.append(" ".join(words))
        write(
            pa.table({"task": _strings("t", np.arange(num_tasks)), "text": pa.array(texts)}),
            "tasks.csv",
        )
    return CrowdData(
        annotations=str(out / "annotations.csv"),
        annotators=str(out / "annotators.csv"),
        tasks=str(out / "tasks.csv") if with_text else "",
        truth=str(out / "truth.csv"),
        group_matrices=G,
        num_annotations=len(tasks),
    )
