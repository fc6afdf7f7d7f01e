"""A bag-of-n-grams text classifier (fastText-style) learned from soft labels, on a DTensor mesh.

    ids_i   = hash buckets of the unigrams and bigrams of text_i        # [batch, max_tokens], -1 = pad
    e_i     = mean_{t in ids_i} E[t]                                     # [batch, d]
    h_i     = relu(W1ᵀ e_i + b1)                                         # [batch, hidden]
    p(z_i = k) = softmax(W2ᵀ h_i + b2)_k                                 # [batch, K]
    loss    = - mean_i sum_k q_i(k) log p(z_i = k)                       # q: the EM posterior (soft label)

Training on the posteriors rather than the argmax keeps the aggregation's uncertainty: a task the crowd
split 50/50 pulls the classifier half as hard as a unanimous one.

Layouts (`TextClassifier.layouts`): the embedding table is sharded on its embedding dimension over
``model`` (never on rows: DTensor refuses a gather from a row-sharded table), W1 row-parallel on the same
dimension (its matmul ends in one all-reduce), W2 and the biases replicated; the batch over ``batch``.

`text_to_ids` is the preprocessing, in TensorFlow ops so that it runs eagerly, inside `tf.data.map`, or
inside a SavedModel alike.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from headrace.core import mesh as mesh_lib

__all__ = ["TextClassifier", "TextClassifierConfig", "text_to_ids"]


@dataclasses.dataclass(frozen=True)
class TextClassifierConfig:
    num_classes: int = 2
    buckets: int = 1 << 14
    embed_dim: int = 32
    hidden: int = 32
    max_tokens: int = 48
    seed: int = 0


def text_to_ids(text, buckets: int, max_tokens: int):
    """[batch] strings -> [batch, max_tokens] int64 hash buckets of unigrams and bigrams, -1 padded."""
    text = tf.convert_to_tensor(text, tf.string)
    cleaned = tf.strings.regex_replace(tf.strings.lower(text), r"[^\p{L}\p{N}_']+", " ")
    words = tf.strings.split(cleaned)  # ragged [batch, None]
    bigrams = tf.strings.ngrams(words, 2, separator=" ")
    grams = tf.concat([words, bigrams], axis=1)
    ids = tf.strings.to_hash_bucket_fast(grams, buckets)
    return ids.to_tensor(default_value=-1, shape=[None, max_tokens])


class TextClassifier(tf.Module):
    """See module docstring; `mesh=None` builds plain variables (the unsharded reference)."""

    def __init__(self, config: TextClassifierConfig, mesh=None):
        super().__init__(name="text_classifier")
        self.config = c = config
        lay = self.layouts(mesh) if mesh is not None else {}
        init = mesh_lib.initial_value
        self.embedding = mesh_lib.variable(
            init((c.buckets, c.embed_dim), c.seed + 1, kind="normal", stddev=0.05),
            lay.get("embedding"),
            name="embedding",
        )
        self.w1 = mesh_lib.variable(init((c.embed_dim, c.hidden), c.seed + 2), lay.get("w1"), name="w1")
        self.b1 = mesh_lib.variable(init((c.hidden,), 0, kind="zeros"), lay.get("b1"), name="b1")
        self.w2 = mesh_lib.variable(init((c.hidden, c.num_classes), c.seed + 3), lay.get("w2"), name="w2")
        self.b2 = mesh_lib.variable(init((c.num_classes,), 0, kind="zeros"), lay.get("b2"), name="b2")

    @property
    def weights(self) -> list:
        return [self.embedding, self.w1, self.b1, self.w2, self.b2]

    @staticmethod
    def layouts(mesh) -> dict:
        model = "model" if "model" in mesh.dim_names else None
        return {
            "embedding": mesh_lib.layout(mesh, None, model),
            "w1": mesh_lib.layout(mesh, model, None),
            "b1": mesh_lib.layout(mesh, None),
            "w2": mesh_lib.layout(mesh, None, None),
            "b2": mesh_lib.layout(mesh, None),
        }

    def __call__(self, ids):
        """`ids` [batch, max_tokens] int64 (-1 = padding) -> logits [batch, K]."""
        mask = tf.cast(ids >= 0, tf.float32)  # [batch, L]
        emb = tf.gather(self.embedding, tf.maximum(ids, 0))  # [batch, L, d]
        count = tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), 1.0)  # [batch, 1]
        bag = tf.reduce_sum(emb * mask[:, :, None], axis=1) / count  # [batch, d]
        hidden = tf.nn.relu(tf.matmul(bag, self.w1) + self.b1)  # [batch, hidden]
        return tf.matmul(hidden, self.w2) + self.b2  # [batch, K]

    def loss(self, ids, soft_labels):
        """Cross-entropy against soft labels [batch, K]."""
        log_p = tf.nn.log_softmax(self(ids), axis=-1)
        return -tf.reduce_mean(tf.reduce_sum(soft_labels * log_p, axis=-1))
