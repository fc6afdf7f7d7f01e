"""The sparse half of a CTR model on a mesh: embedding rows, first-order weights, their lazy-Adam moments,
and per-field gates for feature selection.

`SparseEmbeddings` holds E [R, D] (sharded on D over ``model``: DTensor refuses a gather from a matrix
sharded on rows), w [R, 1] (replicated) and the moments of both. A step gathers the batch's unique rows
(`gather`: rows assigned this step are re-initialised from their id, `hash_init`), computes their new
values with `headrace.models.optim.adam_rows`, and writes them back (`write`): in place without a mesh,
out of place on one (DTensor has no layout propagation for in-place scatters; the cost is measured in
`headrace.models.embedding`). The id -> row map itself is the host's `CollisionlessTable`.

`Gates` are K sets of per-field gate logits [K, F] (replicated), the differentiable feature selection of
Ensemble Gating.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from headrace.core import mesh as mesh_lib
from headrace.models.embedding import hash_init

__all__ = ["GATE_INIT_SPREAD", "Gates", "SparseEmbeddings"]


class SparseEmbeddings(tf.Module):
    """E [R, D], w [R, 1] and their lazy-Adam moments; rows are initialised when first assigned (fresh)."""

    def __init__(self, capacity: int, dim: int, mesh=None):
        super().__init__(name="sparse")
        self.mesh, self.dim = mesh, dim
        lay = self.layouts(mesh) if mesh is not None else {}

        def zeros(shape, name, kind):
            return mesh_lib.variable(np.zeros(shape, np.float32), lay.get(kind), name=name, trainable=False)

        self.E, self.mE, self.vE = (zeros((capacity, dim), n, "E") for n in ("E", "mE", "vE"))
        self.w, self.mw, self.vw = (zeros((capacity, 1), n, "w") for n in ("w", "mw", "vw"))

    @staticmethod
    def layouts(mesh) -> dict:
        model = "model" if "model" in mesh.dim_names else None
        return {"E": mesh_lib.layout(mesh, None, model), "w": mesh_lib.layout(mesh, None, None)}

    def gather(self, rows, ids, fresh, init_scale: float):
        """The unique rows [U] of a batch: ``(E_u [U, D], w_u [U, 1], moments)``, fresh rows (assigned
        this step, `fresh` [U] bool) initialised from their `ids` and with zero moments."""
        fresh_f = tf.cast(fresh, tf.float32)[:, None]
        keep = 1.0 - fresh_f
        E_u = tf.gather(self.E, rows) * keep + hash_init(ids, self.dim, init_scale) * fresh_f  # [U, D]
        w_u = tf.gather(self.w, rows) * keep  # [U, 1]
        moments = {n: tf.gather(getattr(self, n), rows) * keep for n in ("mE", "vE", "mw", "vw")}
        return E_u, w_u, moments

    def write(self, rows, values: dict) -> None:
        """Writes new values (``{"E": [U, D], "mE": ..., "w": [U, 1], ...}``) to `rows` [U]."""
        idx = rows[:, None]
        for name, value in values.items():
            var = getattr(self, name)
            if self.mesh is None:  # plain TensorFlow: in place, O(U * D)
                var.scatter_nd_update(idx, value)
            else:  # DTensor has no in-place scatter: out of place, O(R * D / model) per device
                var.assign(tf.tensor_scatter_nd_update(var, idx, value))

    def lookup(self, rows):
        """Embeddings [..., D] and first-order weights [...] of rows of any shape (serving, evaluation)."""
        return tf.gather(self.E, rows), tf.gather(self.w[:, 0], rows)


# Spread of an ensemble's initial gate logits. At 1.0 a member could start a weak field at p = 0.12 and not
# reopen it within an epoch (seen on the planted log: I5's members ended at 0.12, 0.81, 0.26, 0.79); 0.5
# still starts the members on different subsets.
GATE_INIT_SPREAD = 0.5


class Gates(tf.Module):
    """K sets of per-field gate logits [K, F] (replicated)."""

    def __init__(self, num_fields: int, ensemble: int, seed: int, mesh=None):
        super().__init__(name="gates")
        # One gate set starts undecided (p = 0.5); an ensemble starts spread (independent draws).
        if ensemble == 1:
            init = np.zeros((1, num_fields), np.float32)
        else:
            init = (
                np.random.default_rng(seed + 99)
                .normal(0.0, GATE_INIT_SPREAD, (ensemble, num_fields))
                .astype(np.float32)
            )
        self.logits = mesh_lib.variable(
            init, mesh_lib.layout(mesh, None, None) if mesh else None, name="gate_logits"
        )

    def values(self, member, noise, temperature: float):
        """Relaxed gates z [B, F] of each example's gate set `member` [B] with logistic `noise` [B, F]."""
        return tf.sigmoid((tf.gather(self.logits, member) + noise) / temperature)

    def probability(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-mesh_lib.to_numpy(self.logits)))  # [K, F]
