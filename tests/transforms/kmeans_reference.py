"""A plain numpy k-means (Lloyd's algorithm, written independently of headrace.transforms.kmeans: full
pairwise distances by broadcasting, per-cluster means by masks): the reference the Beam combine is
checked against."""

from __future__ import annotations

import numpy as np


def lloyd(rows: np.ndarray, init: np.ndarray, iterations: int) -> tuple[np.ndarray, list[float]]:
    """(centroids after `iterations` steps from `init`, the inertia of each step against the centroids it
    started from); a centroid no row chooses stays where it is."""
    x = np.asarray(rows, np.float64)
    c = np.array(init, np.float64)
    inertia = []
    for _ in range(iterations):
        d2 = ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)  # [n, k]
        nearest = d2.argmin(axis=1)
        inertia.append(float(d2[np.arange(len(x)), nearest].sum()))
        for j in range(len(c)):
            members = x[nearest == j]
            if len(members):
                c[j] = members.mean(axis=0)
    return c, inertia
