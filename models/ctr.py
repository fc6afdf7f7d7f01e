"""CTR models over field embeddings: LR, FM, Wide&Deep, DeepFM, DCN, DCN-v2, on a DTensor mesh.

Every model reads the same inputs, gathered by the trainer from the collisionless table
(`headrace.models.embedding`): per example and field f, an embedding e_f [D] and a first-order weight
w_f (both zero for missing values and ids not admitted), optionally scaled by a field gate z_f.

    LR        logit = b + sum_f w_f
    FM        logit = b + sum_f w_f + 1/2 sum_d [(sum_f e_fd)^2 - sum_f e_fd^2]          (Rendle 2010)
    Wide&Deep logit = b + sum_f w_f + MLP([e_1; ...; e_F])                            (Cheng et al. 2016)
    DeepFM    logit = FM + MLP([e_1; ...; e_F])                                       (Guo et al. 2017)
    DCN       x_{l+1} = x0 (x_l . w_l) + b_l + x_l ;  logit = v . [x_L ; MLP(x0)] + b   (Wang et al. 2017)
    DCN-v2    x_{l+1} = x0 * (W_l x_l + b_l) + x_l ;  logit = v . [x_L ; MLP(x0)] + b   (Wang et al. 2021)
              with x0 = [e_1; ...; e_F]

Layouts (`CTRModel.layouts`): the batch is split over ``batch``. MLP layers alternate column- and
row-parallel over ``model`` (Megatron: one all-reduce per pair); DCN-v2's cross matrices are column-
parallel; small vectors are replicated. Dimensions sharded over ``model`` must be divisible by its size.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Literal

import tensorflow as tf

from headrace.core import mesh as mesh_lib

__all__ = ["MODELS", "CTRModel", "CTRModelConfig"]

MODELS = ("lr", "fm", "wide_deep", "deepfm", "dcn", "dcn_v2")
ModelName = Literal["lr", "fm", "wide_deep", "deepfm", "dcn", "dcn_v2"]


@dataclasses.dataclass(frozen=True)
class CTRModelConfig:
    name: ModelName = "deepfm"
    num_fields: int = 39
    embedding_dim: int = 16
    hidden: tuple[int, ...] = (256, 128)
    cross_layers: int = 3
    seed: int = 0

    @property
    def uses_mlp(self) -> bool:
        return self.name in ("wide_deep", "deepfm", "dcn", "dcn_v2")

    @property
    def uses_linear(self) -> bool:
        return self.name in ("lr", "fm", "wide_deep", "deepfm")


class CTRModel(tf.Module):
    """The dense part of a CTR model; `mesh=None` builds plain variables (the unsharded reference)."""

    def __init__(self, config: CTRModelConfig, mesh=None):
        super().__init__(name=f"ctr_{config.name}")
        self.config = c = config
        lay = self.layouts(c, mesh) if mesh is not None else {}
        init = mesh_lib.initial_value
        d = c.num_fields * c.embedding_dim
        self.bias = mesh_lib.variable(init((1,), 0, kind="zeros"), lay.get("bias"), name="bias")
        self.mlp = []
        if c.uses_mlp:
            sizes = [d, *c.hidden]
            for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
                w = mesh_lib.variable(
                    init((n_in, n_out), c.seed + 10 + i), lay.get(f"mlp_w{i}"), name=f"mlp_w{i}"
                )
                b = mesh_lib.variable(init((n_out,), 0, kind="zeros"), lay.get(f"mlp_b{i}"), name=f"mlp_b{i}")
                self.mlp.append((w, b))
        self.cross = []
        if c.name in ("dcn", "dcn_v2"):
            for i in range(c.cross_layers):
                shape = (d,) if c.name == "dcn" else (d, d)
                w = mesh_lib.variable(
                    init(shape, c.seed + 30 + i, kind="normal", stddev=0.01),
                    lay.get(f"cross_w{i}"),
                    name=f"cross_w{i}",
                )
                b = mesh_lib.variable(init((d,), 0, kind="zeros"), lay.get(f"cross_b{i}"), name=f"cross_b{i}")
                self.cross.append((w, b))
        n_out = (c.hidden[-1] if c.hidden else d) if c.uses_mlp else 0
        if c.name in ("dcn", "dcn_v2"):
            n_out += d
        self.out = None
        if n_out:
            self.out = mesh_lib.variable(init((n_out, 1), c.seed + 50), lay.get("out"), name="out")

    @property
    def weights(self) -> list:
        ws = [self.bias]
        for w, b in self.mlp + self.cross:
            ws += [w, b]
        if self.out is not None:
            ws.append(self.out)
        return ws

    @staticmethod
    def layouts(config: CTRModelConfig, mesh) -> dict:
        """The layout of every weight of `config`'s model on `mesh`."""
        model = "model" if "model" in mesh.dim_names else None
        L = mesh_lib.layout
        lay = {"bias": L(mesh, None)}
        if config.uses_mlp:
            for i in range(len(config.hidden)):
                if i % 2 == 0:  # column-parallel: outputs sharded
                    lay[f"mlp_w{i}"], lay[f"mlp_b{i}"] = L(mesh, None, model), L(mesh, model)
                else:  # row-parallel: inputs sharded, one all-reduce
                    lay[f"mlp_w{i}"], lay[f"mlp_b{i}"] = L(mesh, model, None), L(mesh, None)
        for i in range(config.cross_layers if config.name in ("dcn", "dcn_v2") else 0):
            if config.name == "dcn":
                lay[f"cross_w{i}"], lay[f"cross_b{i}"] = L(mesh, None), L(mesh, None)
            else:
                lay[f"cross_w{i}"], lay[f"cross_b{i}"] = L(mesh, None, model), L(mesh, model)
        if config.uses_mlp or config.name in ("dcn", "dcn_v2"):
            lay["out"] = L(mesh, None, None)
        return lay

    def _deep(self, x):
        for w, b in self.mlp:
            x = tf.nn.relu(tf.matmul(x, w) + b)  # [B, hidden_i]
        return x

    def __call__(self, emb, lin):
        """`emb` [B, F, D] field embeddings, `lin` [B, F] first-order weights -> logits [B]."""
        c = self.config
        logit = tf.zeros_like(lin[:, 0]) + self.bias[0]  # [B]
        if c.uses_linear:
            logit += tf.reduce_sum(lin, axis=1)
        if c.name in ("fm", "deepfm"):
            sum_sq = tf.square(tf.reduce_sum(emb, axis=1))  # [B, D]
            sq_sum = tf.reduce_sum(tf.square(emb), axis=1)  # [B, D]
            logit += 0.5 * tf.reduce_sum(sum_sq - sq_sum, axis=1)
        if c.name in ("lr", "fm"):
            return logit
        x0 = tf.reshape(emb, [-1, c.num_fields * c.embedding_dim])  # [B, F*D]
        parts = []
        if c.name in ("dcn", "dcn_v2"):
            x = x0
            for w, b in self.cross:
                if c.name == "dcn":
                    x = x0 * tf.reduce_sum(x * w, axis=1, keepdims=True) + b + x  # [B, d]
                else:
                    x = x0 * (tf.matmul(x, w) + b) + x  # [B, d]
            parts.append(x)
        parts.append(self._deep(x0))
        h = tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]
        return logit + tf.squeeze(tf.matmul(h, self.out), axis=1)
