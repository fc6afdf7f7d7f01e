"""A decoder-only Transformer over packed sequences, data- and model-parallel on a DTensor mesh.

Parallelism is a choice of which tensor dimensions go over which mesh dimension (Mesh-TensorFlow): the
batch over ``batch``; attention heads, the feed-forward width and the vocabulary of the output projection
over ``model`` (`Transformer.layouts`). The head count must divide the ``model`` size.

Attention, per layer (b batch, h heads, q/k query/key positions, d head width, m model width):

    Q = X Wq, K = X Wk, V = X Wv                       # [b, h, q|k, d]  (Wq: [m, h, d])
    J = Q Kᵀ / sqrt(d)                                 # [b, h, q, k]    logits
    multi_head:     W = softmax_k(J + mask)
    talking_heads:  L = einsum(J, P_l) over heads       # [b, h', q, k]   mix the heads' logits
                    W = softmax_k(L + mask)
                    U = einsum(W, P_w) over heads       # [b, h, q, k]    mix the heads' weights
    O = U V ;  Y = Σ_h O Wo                            # [b, h, q, d] -> [b, q, m]

(Shazeer et al. 2020, "Talking-Heads Attention": with P_l = P_w = I it is multi-head attention.)
The mask is causal and keeps a query inside its packed document: a token attends to key j only when
j <= its position in the row and `segment_ids` agree (segment 0 is padding). Positions are the tokens'
positions inside their document (`positions`), for rotary embeddings (default) or learned ones.

`decode` runs one token at a time with a key-value cache (`init_cache`), for generation: the same
arithmetic as `__call__` on the prefix, without recomputing it.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from headrace.core import mesh as mesh_lib
from headrace.core.errors import ConfigError

__all__ = ["Transformer", "TransformerConfig"]

ATTENTION = ("multi_head", "talking_heads")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 1024
    d_model: int = 64
    heads: int = 4
    head_dim: int = 16
    layers: int = 2
    ffn: int = 128
    max_len: int = 128
    attention: str = "talking_heads"
    norm: str = "rms"  # rms | layer
    activation: str = "swiglu"  # swiglu | gelu
    positions: str = "rotary"  # rotary | learned
    seed: int = 0

    def check(self) -> None:
        if self.attention not in ATTENTION:
            raise ConfigError(f"--attention {self.attention!r}: expected one of {', '.join(ATTENTION)}")
        for name, value, allowed in (
            ("norm", self.norm, ("rms", "layer")),
            ("activation", self.activation, ("swiglu", "gelu")),
            ("positions", self.positions, ("rotary", "learned")),
        ):
            if value not in allowed:
                raise ConfigError(f"--{name} {value!r}: expected one of {', '.join(allowed)}")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ConfigError(f"--head-dim {self.head_dim}: rotary positions need an even head width")


_NEG = -1e9


class Transformer(tf.Module):
    """See the module docstring. `mesh=None` builds plain variables (the unsharded reference)."""

    def __init__(self, config: TransformerConfig, mesh=None):
        super().__init__(name="transformer")
        config.check()
        self.config = c = config
        if mesh is not None and "model" in mesh.dim_names and c.heads % mesh.dim_size("model"):
            raise ConfigError(
                f"--heads {c.heads} does not divide the mesh's model dimension ({mesh.dim_size('model')}): "
                "heads are split over it"
            )
        lay = self.layouts(mesh) if mesh is not None else {}
        init = mesh_lib.initial_value
        seed = iter(range(c.seed * 1000 + 1, c.seed * 1000 + 1000))

        def var(name, shape, kind="normal", stddev=0.02, key=None):
            value = init(shape, next(seed), kind=kind, stddev=stddev)
            return mesh_lib.variable(value, lay.get(key or name), name=name)

        self.embedding = var("embedding", (c.vocab_size, c.d_model))
        self.position_embedding = (
            var("position_embedding", (c.max_len, c.d_model)) if c.positions == "learned" else None
        )
        self.blocks = []
        for i in range(c.layers):
            block = {
                "norm1": var(f"l{i}_norm1", (c.d_model,), "ones", key="norm"),
                "wq": var(f"l{i}_wq", (c.d_model, c.heads, c.head_dim), stddev=c.d_model**-0.5, key="wq"),
                "wk": var(f"l{i}_wk", (c.d_model, c.heads, c.head_dim), stddev=c.d_model**-0.5, key="wk"),
                "wv": var(f"l{i}_wv", (c.d_model, c.heads, c.head_dim), stddev=c.d_model**-0.5, key="wv"),
                "wo": var(
                    f"l{i}_wo",
                    (c.heads, c.head_dim, c.d_model),
                    stddev=(c.heads * c.head_dim) ** -0.5,
                    key="wo",
                ),
                "norm2": var(f"l{i}_norm2", (c.d_model,), "ones", key="norm"),
                "w_in": var(f"l{i}_w_in", (c.d_model, c.ffn), stddev=c.d_model**-0.5, key="w_in"),
                "w_out": var(f"l{i}_w_out", (c.ffn, c.d_model), stddev=c.ffn**-0.5, key="w_out"),
            }
            if c.activation == "swiglu":
                block["w_gate"] = var(f"l{i}_w_gate", (c.d_model, c.ffn), stddev=c.d_model**-0.5, key="w_in")
            if c.norm == "layer":
                block["bias1"] = var(f"l{i}_bias1", (c.d_model,), "zeros", key="norm")
                block["bias2"] = var(f"l{i}_bias2", (c.d_model,), "zeros", key="norm")
            if c.attention == "talking_heads":
                # Initialised near the identity: training starts from multi-head attention.
                eye = tf.eye(c.heads).numpy()
                for p in ("p_logits", "p_weights"):
                    value = eye + init((c.heads, c.heads), next(seed), kind="normal", stddev=0.01)
                    block[p] = mesh_lib.variable(value, lay.get("talking"), name=f"l{i}_{p}")
            self.blocks.append(block)
        self.final_norm = var("final_norm", (c.d_model,), "ones", key="norm")
        self.final_bias = var("final_bias", (c.d_model,), "zeros", key="norm") if c.norm == "layer" else None
        self.unembed = var("unembed", (c.d_model, c.vocab_size), stddev=c.d_model**-0.5)

    @property
    def weights(self) -> list:
        """Every trainable variable, in a fixed order (blocks' weights by name)."""
        out = [self.embedding, self.position_embedding]
        for block in self.blocks:
            out += [block[k] for k in sorted(block)]
        out += [self.final_norm, self.final_bias, self.unembed]
        return [w for w in out if w is not None]

    @staticmethod
    def layouts(mesh) -> dict:
        """The layout of every kind of weight on `mesh` (dimensions ``batch`` and ``model`` if present).
        The input embedding is split on its width, never on rows (DTensor refuses a gather from a table
        sharded on dimension 0); the vocabulary is split in the output projection."""
        m = "model" if "model" in mesh.dim_names else None
        lay = mesh_lib.layout
        return {
            "embedding": lay(mesh, None, m),
            "position_embedding": lay(mesh, None, m),
            "norm": lay(mesh, None),
            "wq": lay(mesh, None, m, None),
            "wk": lay(mesh, None, m, None),
            "wv": lay(mesh, None, m, None),
            "wo": lay(mesh, m, None, None),
            "w_in": lay(mesh, None, m),
            "w_out": lay(mesh, m, None),
            "talking": lay(mesh, None, None),
            "unembed": lay(mesh, None, m),
        }

    # -- pieces -----------------------------------------------------------------------------------

    def _norm(self, x, scale, bias=None):
        if self.config.norm == "rms":
            return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + 1e-6) * scale
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(var + 1e-6) * scale + bias

    def _rotary(self, x, positions):
        """Rotates channel pairs (i, i + d/2) of `x` [b, h, l, d] by angles ``position / 10000^(2i/d)``
        (the half-split form: no strided slice, which DTensor cannot lay out)."""
        d = self.config.head_dim
        inv = 1.0 / (10000.0 ** (tf.range(0, d, 2, dtype=tf.float32) / d))  # [d/2]
        angle = tf.cast(positions, tf.float32)[:, None, :, None] * inv  # [b, 1, l, d/2]
        cos, sin = tf.cos(angle), tf.sin(angle)
        x1, x2 = tf.split(x, 2, axis=-1)  # [b, h, l, d/2] each
        return tf.concat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)

    def _attend(self, block, q, k, v, mask):
        """q [b, h, q, d], k and v [b, h, k, d], mask [b, 1, q, k] (True: may attend) -> [b, h, q, d]."""
        logits = tf.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(self.config.head_dim)  # J
        if self.config.attention == "talking_heads":
            logits = tf.einsum("bhqk,hg->bgqk", logits, block["p_logits"])  # L = J P_l
        logits = tf.where(mask, logits, _NEG)
        weights = tf.nn.softmax(logits, axis=-1)  # W
        if self.config.attention == "talking_heads":
            weights = tf.einsum("bgqk,gh->bhqk", weights, block["p_weights"])  # U = W P_w
        return tf.einsum("bhqk,bhkd->bhqd", weights, v)

    def _ffn(self, block, x):
        hidden = tf.einsum("blm,mf->blf", x, block["w_in"])
        if self.config.activation == "swiglu":
            hidden = tf.nn.silu(tf.einsum("blm,mf->blf", x, block["w_gate"])) * hidden
        else:
            hidden = tf.nn.gelu(hidden)
        return tf.einsum("blf,fm->blm", hidden, block["w_out"])

    def _embed(self, tokens, positions):
        x = tf.gather(self.embedding, tokens)  # [b, l, m]
        if self.position_embedding is not None:
            x += tf.gather(self.position_embedding, positions)
        return x

    def _qkv(self, block, h, positions):
        q = tf.einsum("blm,mhd->bhld", h, block["wq"])
        k = tf.einsum("blm,mhd->bhld", h, block["wk"])
        v = tf.einsum("blm,mhd->bhld", h, block["wv"])
        if self.config.positions == "rotary":
            q, k = self._rotary(q, positions), self._rotary(k, positions)
        return q, k, v

    def _logits(self, x):
        return tf.einsum("blm,mv->blv", self._norm(x, self.final_norm, self.final_bias), self.unembed)

    # -- the model --------------------------------------------------------------------------------

    def __call__(self, tokens, segment_ids, positions):
        """Logits [b, l, vocab] of every next token; inputs [b, l] int (segment 0: padding)."""
        tokens = tf.cast(tokens, tf.int32)
        positions = tf.cast(positions, tf.int32)
        segment_ids = tf.cast(segment_ids, tf.int32)
        # Built from the inputs (not from constants, which carry no layout under DTensor) with
        # expand_dims (a strided slice of them cannot be laid out).
        index = tf.cumsum(tf.ones_like(segment_ids), axis=1) - 1  # [b, l] position in the row
        query, key = tf.expand_dims(index, 2), tf.expand_dims(index, 1)  # [b, q, 1], [b, 1, k]
        q_seg, k_seg = tf.expand_dims(segment_ids, 2), tf.expand_dims(segment_ids, 1)
        mask = tf.expand_dims((query >= key) & tf.equal(q_seg, k_seg) & (k_seg > 0), 1)  # [b, 1, q, k]
        x = self._embed(tokens, positions)
        for block in self.blocks:
            h = self._norm(x, block["norm1"], block.get("bias1"))
            q, k, v = self._qkv(block, h, positions)
            x += tf.einsum("bhqd,hdm->bqm", self._attend(block, q, k, v, mask), block["wo"])
            x += self._ffn(block, self._norm(x, block["norm2"], block.get("bias2")))
        return self._logits(x)

    def row_losses(self, tokens, segment_ids, positions):
        """(summed next-token cross-entropy [b], targets counted [b]) per row: a target counts only when
        it is in the same document as the token that predicts it."""
        logits = self(tokens, segment_ids, positions)[:, :-1]  # predicts tokens[:, 1:]
        targets = tf.cast(tokens[:, 1:], tf.int32)
        seg = tf.cast(segment_ids, tf.int32)
        weight = tf.cast((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0), tf.float32)
        xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
        return tf.reduce_sum(xent * weight, axis=1), tf.reduce_sum(weight, axis=1)

    def loss(self, tokens, segment_ids, positions):
        """Mean next-token cross-entropy over the counted targets of the batch."""
        total, count = self.row_losses(tokens, segment_ids, positions)
        return tf.reduce_sum(total) / tf.maximum(tf.reduce_sum(count), 1.0)

    # -- generation -------------------------------------------------------------------------------

    def init_cache(self, batch: int, length: int) -> list[dict]:
        """Empty keys and values for `length` positions, per layer: [b, h, length, d] each."""
        c = self.config
        shape = (batch, c.heads, length, c.head_dim)
        return [{"k": tf.zeros(shape), "v": tf.zeros(shape)} for _ in self.blocks]

    def prefill(self, tokens):
        """A prompt in one pass (one document per row, unsharded): `tokens` [b, n] -> (logits [b, n, vocab]
        of each next token, a cache of `n` positions holding the prompt's keys and values), the same as
        `decode` over positions 0..n-1 one at a time. A prompt padded at its end to the cache's length
        gives the real positions the same logits and keys (the mask is causal): one trace serves every
        prompt length."""
        tokens = tf.cast(tokens, tf.int32)
        index = tf.cumsum(tf.ones_like(tokens), axis=1) - 1  # [b, n]
        mask = tf.expand_dims(tf.expand_dims(index, 2) >= tf.expand_dims(index, 1), 1)  # [b, 1, q, k]
        x = self._embed(tokens, index)
        cache = []
        for block in self.blocks:
            h = self._norm(x, block["norm1"], block.get("bias1"))
            q, k, v = self._qkv(block, h, index)
            cache.append({"k": k, "v": v})
            x += tf.einsum("bhqd,hdm->bqm", self._attend(block, q, k, v, mask), block["wo"])
            x += self._ffn(block, self._norm(x, block["norm2"], block.get("bias2")))
        return self._logits(x), cache

    def decode(self, token, index, cache):
        """One step of generation (one document per row, unsharded): `token` [b] at position `index` (a
        scalar) -> (logits [b, vocab] of the next token, the cache with this position's keys and values)."""
        token = tf.cast(token, tf.int32)[:, None]  # [b, 1]
        positions = tf.zeros_like(token) + tf.cast(index, tf.int32)
        length = cache[0]["k"].shape[2]
        mask = (tf.range(length) <= index)[None, None, None, :]  # [1, 1, 1, k]
        x = self._embed(token, positions)
        updated = []
        for block, layer in zip(self.blocks, cache):
            h = self._norm(x, block["norm1"], block.get("bias1"))
            q, k, v = self._qkv(block, h, positions)  # [b, h, 1, d]
            at = tf.one_hot(index, length)[None, None, :, None]  # [1, 1, length, 1]
            keys = layer["k"] * (1 - at) + k * at
            values = layer["v"] * (1 - at) + v * at
            updated.append({"k": keys, "v": values})
            x += tf.einsum("bhqd,hdm->bqm", self._attend(block, q, keys, values, mask), block["wo"])
            x += self._ffn(block, self._norm(x, block["norm2"], block.get("bias2")))
        return self._logits(x)[:, 0], updated
