"""A small tabular model for the example pipeline's records, data- and model-parallel on a DTensor mesh.

    e_i    = mean_{t in tokens_i} E[t]                      # bag of token embeddings   [batch, d]
    h_i    = relu(W1ᵀ [x_i ; e_i] + b1)                     # hidden layer              [batch, hidden]
    logit_i = w2ᵀ h_i + b2                                  # [batch]
    p(y_i = 1) = sigmoid(logit_i)

It exists to prove the foundation end to end (records written by Beam, read by tf.data, trained on a mesh)
and to be the shrunk model of the sharded-vs-unsharded equivalence test. Layouts (`MLP.layouts`): the
batch is split over ``batch``; the hidden units and the embedding columns over ``model`` (Megatron-style:
W1 column-parallel, w2 row-parallel, so the only collective in the forward pass is the all-reduce of
w2ᵀh). The embedding table is sharded on its embedding dimension, never on rows: DTensor refuses a gather
from a table sharded on dimension 0.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from headrace.core import mesh as mesh_lib

__all__ = ["MLP", "MLPConfig"]


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    num_dense: int = 4
    vocab_size: int = 100
    embed_dim: int = 8
    hidden: int = 32
    seed: int = 0


class MLP(tf.Module):
    """See module docstring. `mesh=None` builds plain variables (the unsharded reference)."""

    def __init__(self, config: MLPConfig, mesh=None):
        super().__init__(name="mlp")
        self.config = config
        c = config
        lay = self.layouts(mesh) if mesh is not None else {}
        init = mesh_lib.initial_value
        self.embedding = mesh_lib.variable(
            init((c.vocab_size, c.embed_dim), c.seed + 1, kind="normal", stddev=0.1),
            lay.get("embedding"),
            name="embedding",
        )
        self.w1 = mesh_lib.variable(
            init((c.num_dense + c.embed_dim, c.hidden), c.seed + 2), lay.get("w1"), name="w1"
        )
        self.b1 = mesh_lib.variable(init((c.hidden,), 0, kind="zeros"), lay.get("b1"), name="b1")
        self.w2 = mesh_lib.variable(init((c.hidden, 1), c.seed + 3), lay.get("w2"), name="w2")
        self.b2 = mesh_lib.variable(init((1,), 0, kind="zeros"), lay.get("b2"), name="b2")

    @property
    def weights(self) -> list:
        return [self.embedding, self.w1, self.b1, self.w2, self.b2]

    @staticmethod
    def layouts(mesh) -> dict:
        """The layout of every weight on `mesh` (dimensions ``batch`` and ``model`` if present)."""
        model = "model" if "model" in mesh.dim_names else None
        return {
            "embedding": mesh_lib.layout(mesh, None, model),
            "w1": mesh_lib.layout(mesh, None, model),
            "b1": mesh_lib.layout(mesh, model),
            "w2": mesh_lib.layout(mesh, model, None),
            "b2": mesh_lib.layout(mesh, None),
        }

    def __call__(self, dense, tokens):
        """`dense` [batch, num_dense] float32; `tokens` [batch, max_len] int64, -1 = padding."""
        mask = tf.cast(tokens >= 0, tf.float32)  # [batch, max_len]
        ids = tf.maximum(tokens, 0)
        emb = tf.gather(self.embedding, ids)  # [batch, max_len, d]
        count = tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), 1.0)  # [batch, 1]
        bag = tf.reduce_sum(emb * mask[:, :, None], axis=1) / count  # [batch, d]
        features = tf.concat([dense, bag], axis=1)  # [batch, num_dense + d]
        hidden = tf.nn.relu(tf.matmul(features, self.w1) + self.b1)  # [batch, hidden]
        logit = tf.matmul(hidden, self.w2) + self.b2  # [batch, 1]
        return tf.squeeze(logit, axis=1)  # [batch]

    def loss(self, batch):
        """Mean sigmoid cross-entropy of a batch dict with ``dense``, ``tokens``, ``label``."""
        logits = self(batch["dense"], batch["tokens"])
        labels = tf.cast(batch["label"], tf.float32)
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
