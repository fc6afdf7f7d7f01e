"""A CTR model's serving copy: self-contained, from 39 raw Criteo fields to a click probability.

`ServingCTR` holds the hashing (`serving_ids`), the sorted ids that have rows with their embeddings
compacted (row 0 the null row), the dense model and per-field weights (the gates' mean, or the
selected-field mask). `save_serving` writes it as a SavedModel whose ``serving_default`` takes the 39
fields as [B] strings ("" = missing) and returns ``probability`` [B]. The batch trainer exports one; the
online trainer publishes one per sync.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from headrace.core import mesh as mesh_lib
from headrace.models.ctr import CTRModel, CTRModelConfig
from headrace.models.embedding import FIELDS, CollisionlessTable, serving_ids
from headrace.models.sparse import SparseEmbeddings

__all__ = ["ServingCTR", "VersionWriter", "save_serving"]


class ServingCTR(tf.Module):
    """`keys` [N] ids, `E` [N, D] and `w` [N, 1] their rows; `dense` the model's weights (numpy, in
    `CTRModel.weights` order); `field_weight` [39]; `logit_shift` is added to the logit (log of the
    negative keep rate: the log-odds correction for a model trained on sampled negatives).

    The ids are kept sorted (row ``k + 1`` of `E` for ``keys[k]``, row 0 the null row) and looked up by
    binary search, and every variable has a free leading dimension: `update` replaces all of them with no
    change to the graph, so that a publisher traces the serving function once and each new version is a
    save of the same graph with new values."""

    def __init__(
        self, model_config: CTRModelConfig, keys, E, w, dense, field_weight, logit_shift: float = 0.0
    ):
        super().__init__(name="serving_ctr")
        dim = model_config.embedding_dim
        self.E = tf.Variable(tf.zeros([1, dim]), shape=[None, dim], trainable=False, name="E")
        self.w = tf.Variable(tf.zeros([1, 1]), shape=[None, 1], trainable=False, name="w")
        # Saved with the model (variables, not graph constants), so that `headrace export ctr --int8` can
        # rebuild the same computation outside TensorFlow.
        self.keys = tf.Variable(tf.zeros([0], tf.int64), shape=[None], trainable=False, name="keys")
        self.field_weight = tf.Variable(tf.ones([39]), trainable=False, name="field_weight")
        self.logit_shift = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="logit_shift")
        self.model = CTRModel(model_config)
        self.update(keys, E, w, dense, field_weight, logit_shift)
        object.__setattr__(self, "_serve", None)  # not a tracked attribute: the signature is saved

    def update(self, keys, E, w, dense, field_weight, logit_shift: float = 0.0) -> None:
        """Replaces every value (any number of ids); `dense` may be empty (the weights stay)."""
        keys = np.asarray(keys, np.int64)
        order = np.argsort(keys, kind="stable")
        dim = self.E.shape[1]
        E = np.asarray(E, np.float32).reshape(-1, dim)[order]
        w = np.asarray(w, np.float32).reshape(-1, 1)[order]
        self.keys.assign(keys[order])
        self.E.assign(np.concatenate([np.zeros((1, dim), np.float32), E]))
        self.w.assign(np.concatenate([np.zeros((1, 1), np.float32), w]))
        for dst, src in zip(self.model.weights, dense):
            dst.assign(src)
        self.field_weight.assign(np.asarray(field_weight, np.float32))
        self.logit_shift.assign(float(logit_shift))

    def rows(self, ids):
        """ids [B, 39] -> their rows of `E` (0: an id without a row)."""
        flat = tf.reshape(ids, [-1])
        n = tf.size(self.keys, out_type=tf.int64)

        def search():
            at = tf.minimum(tf.searchsorted(self.keys, flat, out_type=tf.int64), n - 1)
            return tf.where(tf.equal(tf.gather(self.keys, at), flat), at + 1, tf.zeros_like(at))

        rows = tf.cond(n > 0, search, lambda: tf.zeros_like(flat))
        return tf.reshape(rows, tf.shape(ids))

    def serving_function(self):
        """``serving_default``: the 39 raw fields as [B] strings -> ``probability`` [B], traced once."""
        if self._serve is None:

            @tf.function
            def serve(**fields):
                return {"probability": self.probability(fields)}

            specs = {name: tf.TensorSpec([None], tf.string, name=name) for name in FIELDS}
            object.__setattr__(self, "_serve", serve.get_concrete_function(**specs))
        return self._serve

    @classmethod
    def from_state(
        cls,
        model: CTRModel,
        table: CollisionlessTable,
        sparse: SparseEmbeddings,
        field_weight,
        logit_shift: float = 0.0,
    ) -> ServingCTR:
        """A copy of a trained model: the rows of every id the table holds."""
        keys, rows = table.rows.export()
        keys, rows = keys.numpy(), rows.numpy()
        live = rows > 0
        keys, rows = keys[live], rows[live]
        E, w = mesh_lib.to_numpy(sparse.E), mesh_lib.to_numpy(sparse.w)
        dense = [mesh_lib.to_numpy(v) for v in model.weights]
        return cls(model.config, keys, E[rows], w[rows], dense, field_weight, logit_shift)

    def probability(self, fields: dict):
        return self.from_rows(self.rows(serving_ids(fields)))  # ids [B, 39]

    def from_rows(self, rows):
        """Rows [B, 39] of `E` (0: no row) -> click probability [B]: the part after the id table."""
        emb = tf.gather(self.E, rows) * self.field_weight[None, :, None]
        lin = tf.gather(self.w[:, 0], rows) * self.field_weight[None, :]
        return tf.sigmoid(self.model(emb, lin) + self.logit_shift)


def save_serving(module: ServingCTR, path: str | Path) -> Path:
    """Writes `module` as a SavedModel: serving_default takes the 39 raw Criteo fields (strings) and
    returns ``probability``."""
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serving_function()})
    return Path(path)


class VersionWriter:
    """Writes successive versions of one `ServingCTR` as SavedModels, cheaply after the first.

    The first version is a full `save_serving`. The module's graph never changes (`ServingCTR.update`
    only assigns), so each later version is the first one's ``saved_model.pb`` and a checkpoint of the
    module's variables in SavedModel layout: no retracing and no graph serialisation per version, which
    was most of an online trainer's sync (tests/models/test_ctr_serving.py loads both kinds and compares
    them with a full save of the same values)."""

    def __init__(self, module: ServingCTR):
        self.module = module
        self._graph: bytes | None = None

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        if self._graph is None:
            save_serving(self.module, path)
            self._graph = (path / "saved_model.pb").read_bytes()
            return path
        (path / "variables").mkdir(parents=True)
        (path / "assets").mkdir()
        (path / "saved_model.pb").write_bytes(self._graph)
        tf.train.Checkpoint(root=self.module).write(str(path / "variables" / "variables"))
        return path
