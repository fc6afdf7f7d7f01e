"""A CTR model's serving copy: self-contained, from 39 raw Criteo fields to a click probability.

`ServingCTR` holds the hashing (`serving_ids`), a frozen id -> row table of the ids that have rows, their
embeddings compacted (row 0 the null row), the dense model and per-field weights (the gates' mean, or the
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

__all__ = ["ServingCTR", "save_serving"]


class ServingCTR(tf.Module):
    """`keys` [N] ids, `E` [N, D] and `w` [N, 1] their rows; `dense` the model's weights (numpy, in
    `CTRModel.weights` order); `field_weight` [39]; `logit_shift` is added to the logit (log of the
    negative keep rate: the log-odds correction for a model trained on sampled negatives)."""

    def __init__(
        self, model_config: CTRModelConfig, keys, E, w, dense, field_weight, logit_shift: float = 0.0
    ):
        super().__init__(name="serving_ctr")
        keys = np.asarray(keys, np.int64)
        compact = np.arange(1, len(keys) + 1, dtype=np.int64)
        dim = model_config.embedding_dim
        self.E = tf.Variable(
            np.concatenate([np.zeros((1, dim), np.float32), np.asarray(E, np.float32).reshape(-1, dim)]),
            trainable=False,
            name="E",
        )
        self.w = tf.Variable(
            np.concatenate([np.zeros((1, 1), np.float32), np.asarray(w, np.float32).reshape(-1, 1)]),
            trainable=False,
            name="w",
        )
        if len(keys):
            init = tf.lookup.KeyValueTensorInitializer(tf.constant(keys), tf.constant(compact))
        else:  # a table needs one entry: the null id, which reads the null row anyway
            init = tf.lookup.KeyValueTensorInitializer(tf.constant([0], tf.int64), tf.constant([0], tf.int64))
        self.rows = tf.lookup.StaticHashTable(init, default_value=0)
        self.model = CTRModel(model_config)
        for dst, src in zip(self.model.weights, dense):
            dst.assign(src)
        # Saved with the model (variables, not graph constants), so that `headrace export ctr --int8` can
        # rebuild the same computation outside TensorFlow's id table.
        self.keys = tf.Variable(keys, trainable=False, name="keys")
        self.field_weight = tf.Variable(
            np.asarray(field_weight, np.float32), trainable=False, name="field_weight"
        )
        self.logit_shift = tf.Variable(
            float(logit_shift), trainable=False, dtype=tf.float32, name="logit_shift"
        )

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
        ids = serving_ids(fields)  # [B, 39]
        return self.from_rows(self.rows.lookup(ids))

    def from_rows(self, rows):
        """Rows [B, 39] of `E` (0: no row) -> click probability [B]: the part after the id table."""
        emb = tf.gather(self.E, rows) * self.field_weight[None, :, None]
        lin = tf.gather(self.w[:, 0], rows) * self.field_weight[None, :]
        return tf.sigmoid(self.model(emb, lin) + self.logit_shift)


def save_serving(module: ServingCTR, path: str | Path) -> Path:
    """Writes `module` as a SavedModel: serving_default takes the 39 raw Criteo fields (strings) and
    returns ``probability``."""

    @tf.function
    def serve(**fields):
        return {"probability": module.probability(fields)}

    specs = {name: tf.TensorSpec([None], tf.string, name=name) for name in FIELDS}
    signature = serve.get_concrete_function(**specs)
    tf.saved_model.save(module, str(path), signatures={"serving_default": signature})
    return Path(path)
