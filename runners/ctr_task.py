"""The CTR models as a training task: the config of ``headrace train ctr`` and its step on the mesh.

One training step:
  host   ids = hash(field, raw value) for the 39 fields (tf.data map); the collisionless table assigns
         rows (admission, refresh, expiry); the batch's unique rows U, their counts and each slot's
         index into U are computed once (`place`);
  mesh   gather the unique rows of the embedding (re-initialised from their id if fresh), forward,
         gradients w.r.t. the unique rows (duplicates summed by the gather's gradient), optional
         CowClip, lazy Adam on those rows written back, Adam on the dense weights (`train_step`).

CowClip (Zheng et al., 2022) for large batches: each id's summed gradient is clipped to
``cnt * max(r * ||w||, zeta)``; the embedding learning rate stays fixed; the dense learning rate is scaled
by sqrt(B / base_batch_size) and warmed up linearly; L2 is scaled by B / base_batch_size. ``--optimizer
adam`` is plain Adam with the base hyperparameters at every batch size.

Feature selection: differentiable per-field gates z = sigmoid((a + logistic noise) / T) multiply each
field's embedding and weight, with an L0-style penalty on the expected number of open gates; with
``ensemble_gating`` K gate sets are initialised independently (each example is gated by one of them,
round robin). `headrace.runners.train_ctr` runs the selection and the retraining; the online trainer
(`headrace.runners.train_ctr_online`) trains the same step from a stream.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Literal

import numpy as np
import tensorflow as tf

from headrace.core import cluster
from headrace.core import mesh as mesh_lib
from headrace.core.errors import ConfigError, InputError
from headrace.models import metrics as metrics_lib
from headrace.models.ctr import CTRModel, CTRModelConfig, ModelName
from headrace.models.ctr_serving import ServingCTR, save_serving
from headrace.models.embedding import FIELDS, CollisionlessTable, cowclip, criteo_ids
from headrace.models.optim import Adam, adam_rows
from headrace.models.sparse import Gates, SparseEmbeddings
from headrace.pipelines import ctr as ctr_data
from headrace.runners import loop

__all__ = ["CTRTask", "CTRTrainConfig"]

_log = logging.getLogger("headrace.train")


@dataclasses.dataclass(frozen=True)
class CTRTrainConfig(loop.TrainConfig):
    data: str = dataclasses.field(default="", metadata={"help": "output of `headrace run ctr-ingest`"})
    model: ModelName = "deepfm"
    batch_size: int = 1024
    epochs: int = 1
    optimizer: Literal["adam", "cowclip"] = "adam"
    embedding_dim: int = 16
    min_count: int = dataclasses.field(default=1, metadata={"help": "occurrences before an id gets a row"})
    feature_selection: Literal["none", "gating", "ensemble_gating"] = "none"
    ensemble_size: int = 4
    capacity: int = dataclasses.field(default=1 << 18, metadata={"help": "embedding rows"})
    expire_steps: int = dataclasses.field(
        default=0, metadata={"help": "free rows unused this long (0: never)"}
    )
    expire_every: int = 100
    hidden: tuple[int, ...] = (256, 128)
    cross_layers: int = 3
    learning_rate: float = 1e-3
    embedding_learning_rate: float = 1e-3
    l2: float = 1e-5
    base_batch_size: int = 1024
    cowclip_ratio: float = 1.0
    cowclip_zeta: float = 1e-5
    warmup_epochs: float = 0.5
    gate_temperature: float = 0.5
    gate_penalty: float = 1e-3
    gate_learning_rate: float = 0.05
    gate_threshold: float = 0.5
    fields: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "train on these fields only"})
    steps: int = dataclasses.field(default=0, metadata={"help": "stop after this many steps (0: epochs)"})
    eval_batch_size: int = 4096
    init_scale: float = 0.05
    export: bool = True
    # --online: train continuously from a Kafka topic of joined examples (runners/train_ctr_online.py)
    online: bool = False
    bootstrap: str = dataclasses.field(default="", metadata={"help": "Kafka HOST:PORT (--online)"})
    examples: str = dataclasses.field(default="examples", metadata={"help": "topic of examples (--online)"})
    serving_dir: str = dataclasses.field(
        default="", metadata={"help": "serving copies S/<version>/ (--online)"}
    )
    sync_every: float = dataclasses.field(default=30.0, metadata={"help": "seconds between sparse syncs"})
    dense_sync_every: float = dataclasses.field(
        default=120.0, metadata={"help": "seconds between dense syncs"}
    )
    checkpoint_every_seconds: float = dataclasses.field(
        default=0.0, metadata={"help": "seconds between checkpoints (0: by steps; with --online, 60)"}
    )
    idle_timeout: float = dataclasses.field(
        default=0.0, metadata={"help": "stop when idle this long (0: never)"}
    )
    max_examples: int = dataclasses.field(default=0, metadata={"help": "stop after this many (0: never)"})
    shuffle_buffer: int = dataclasses.field(
        default=4096, metadata={"help": "examples held and drawn from at random (0: arrival order)"}
    )
    max_wait: float = dataclasses.field(
        default=10.0, metadata={"help": "longest an example waits in the buffer before training (s)"}
    )
    dedupe_horizon: float = dataclasses.field(
        default=180.0,
        metadata={
            "help": "seconds behind the join's watermark a request id is remembered (--online; >= 2x the join window)"
        },
    )
    read_chunk: int = 8192
    partition_refresh: float = dataclasses.field(
        default=10.0, metadata={"help": "seconds between listings of the topic's partitions (--online)"}
    )
    poll_interval: float = 0.2
    keep_versions: int = 3


def _count(data: str, split: str) -> int:
    report = Path(data) / "report.json"
    if not report.exists():
        raise InputError(f"--data {data}: no report.json (is it the output of `headrace run ctr-ingest`?)")
    return json.loads(report.read_text())[split]


class CTRTask(loop.Task):
    """One CTR model: the dense model, the sparse rows and the host table (see the module docstring)."""

    eval_every_epoch = True

    def __init__(self, config: CTRTrainConfig, *, gated: bool = False, label: str = ""):
        super().__init__(config)
        c = config
        self.name = f"ctr {c.model}" + (f" {label}" if label else "")
        self.gated = gated
        self.field_mask = np.array(
            [1.0 if (not c.fields or f in c.fields) else 0.0 for f in FIELDS], np.float32
        )
        self.ensemble = c.ensemble_size if (gated and c.feature_selection == "ensemble_gating") else 1
        self._steps_per_epoch = None
        # The table's clock (last use of a row, expiry) is the step count over every run this model has
        # had: a warm start continues it where the earlier model's training stopped.
        self.clock_offset = 0

    # -- set-up -----------------------------------------------------------------------------------

    def create_mesh(self):
        """The mesh of ``--mesh``, or None for none or a one-device one (plain TensorFlow on that device,
        which can update the embedding rows in place)."""
        c = self.config
        mesh = mesh_lib.create_mesh(c.mesh) if c.mesh else None
        if mesh is not None and mesh.num_local_devices() == 1:
            _log.info("mesh %s has one device: training without DTensor", c.mesh)
            mesh = None
        if c.fields:
            unknown = [f for f in c.fields if f not in FIELDS]
            if unknown:
                raise ConfigError(f"--fields: unknown field(s) {unknown} (fields are I1..I13, C1..C26)")
        if mesh is not None and "model" in mesh.dim_names and c.embedding_dim % mesh.dim_size("model"):
            raise ConfigError(
                f"--embedding-dim {c.embedding_dim} must be divisible by the mesh's model={mesh.dim_size('model')}"
            )
        if mesh is not None and "batch" in mesh.dim_names and c.batch_size % mesh.dim_size("batch"):
            raise ConfigError(
                f"--batch-size {c.batch_size} must be divisible by batch={mesh.dim_size('batch')}"
            )
        return mesh

    def build(self, mesh) -> None:
        c = self.config
        self.model = CTRModel(
            CTRModelConfig(
                name=c.model,
                num_fields=len(FIELDS),
                embedding_dim=c.embedding_dim,
                hidden=tuple(c.hidden),
                cross_layers=c.cross_layers,
                seed=c.seed,
            ),
            mesh,
        )
        self.sparse = SparseEmbeddings(c.capacity, c.embedding_dim, mesh)
        self.table = CollisionlessTable(c.capacity, c.min_count, c.expire_steps)
        self.gates = Gates(len(FIELDS), self.ensemble, c.seed, mesh) if self.gated else None
        self.dense_opt = Adam(self.model.weights, learning_rate=c.learning_rate)
        self.gate_opt = (
            Adam([self.gates.logits], learning_rate=c.gate_learning_rate, name="gate_adam")
            if self.gated
            else None
        )
        self.step = mesh_lib.variable(
            np.int64(0), mesh_lib.layout(mesh) if mesh else None, name="step", trainable=False
        )
        self._rng = np.random.default_rng(c.seed + 7)
        self._prepare = tf.function(self._assign_rows, reduce_retracing=True)

    def restored(self, fit: loop.Fit) -> None:
        self.clock_offset = int(mesh_lib.to_numpy(self.step)) - fit.step

    def checkpoint_groups(self):
        mesh_items = {
            "model": self.model,
            "sparse": self.sparse,
            "dense_opt": self.dense_opt,
            "step": self.step,
        }
        if self.gates is not None:
            mesh_items.update(gates=self.gates, gate_opt=self.gate_opt)
        return {"mesh": mesh_items, "host": {"table": self.table}}

    # -- the schedule -----------------------------------------------------------------------------

    def steps_per_epoch(self) -> int:
        if self._steps_per_epoch is None:
            n_train = _count(self.config.data, "train")
            self._steps_per_epoch = n_train // self.config.batch_size
            if self._steps_per_epoch < 1:
                raise ConfigError(
                    f"--batch-size {self.config.batch_size} exceeds the {n_train} training examples"
                )
        return self._steps_per_epoch

    def total_steps(self) -> int:
        return self.config.steps or self.steps_per_epoch() * self.config.epochs

    def rates(self, step: int) -> tuple[float, float, float]:
        """(dense lr, embedding lr, l2) at `step` under the configured scaling rule."""
        c = self.config
        if c.optimizer != "cowclip":
            return c.learning_rate, c.embedding_learning_rate, c.l2
        ratio = c.batch_size / c.base_batch_size
        dense = c.learning_rate * math.sqrt(ratio)
        warmup = max(1, round(c.warmup_epochs * self.steps_per_epoch()))
        if step < warmup:
            dense *= (step + 1) / warmup
        return dense, c.embedding_learning_rate, c.l2 * ratio

    # -- training ---------------------------------------------------------------------------------

    def ids(self, batch):
        """Ids [B, 39] of a parsed CTR batch, zero in fields left out by ``--fields``."""
        ids = criteo_ids(batch["I"], batch["I_missing"], batch["C"])
        mask = tf.constant(self.field_mask > 0)
        return tf.where(mask[None, :], ids, tf.zeros_like(ids))

    def dataset(self, epoch: int):
        c = self.config
        share = cluster.input_share(c)
        ds = ctr_data.dataset(
            c.data, "train", c.batch_size, shuffle=True, seed=c.seed + epoch, drop_remainder=True,
            share=share, repeat=share is not None,
        )  # fmt: skip
        if share is not None:  # streams of unequal length: each repeats, the epoch is counted in batches
            ds = ds.take(self.steps_per_epoch())
        return ds.map(
            lambda b: (self.ids(b), tf.cast(b["label"], tf.float32)), num_parallel_calls=tf.data.AUTOTUNE
        )

    def _assign_rows(self, ids, clock):
        """Table assignment for a batch, the unique rows padded to a power of two (bounded retracing)."""
        u_ids, u_rows, fresh, counts, inv = self.table.assign(ids, clock)
        n = tf.size(u_ids)
        log2 = tf.math.ceil(tf.math.log(tf.cast(n, tf.float32)) / tf.math.log(2.0))
        size = tf.bitwise.left_shift(1, tf.maximum(6, tf.cast(log2, tf.int32)))
        pad = [[0, size - n]]
        return tf.pad(u_rows, pad), tf.pad(u_ids, pad), tf.pad(fresh, pad), tf.pad(counts, pad), inv

    def _batch(self, x):
        return mesh_lib.shard_batch(self.mesh, x) if self.mesh is not None else tf.convert_to_tensor(x)

    def _replicated(self, x):
        from tensorflow.experimental import dtensor

        x = tf.convert_to_tensor(x)
        if self.mesh is None:
            return x
        return dtensor.copy_to_mesh(x, dtensor.Layout.replicated(self.mesh, x.shape.rank))

    def place(self, batch, step: int):
        """(ids [B, 39], labels [B]) -> the step's inputs; `step` is the table's clock."""
        ids, labels = batch
        clock = tf.constant(step + self.clock_offset, tf.int64)
        u_rows, u_ids, fresh, counts, inv = self._prepare(ids, clock)
        if self.gated:
            B = int(labels.shape[0])
            u = self._rng.uniform(1e-6, 1 - 1e-6, size=(B, len(FIELDS)))
            member = self._batch((np.arange(B) % self.ensemble).astype(np.int64))
            noise = self._batch((np.log(u) - np.log1p(-u)).astype(np.float32))
        else:  # unused by the step: placeholders, not per-example tensors
            member = self._replicated(np.zeros([1], np.int64))
            noise = self._replicated(np.zeros([1, 1], np.float32))
        lr_dense, lr_emb, l2 = self.rates(step)
        return (
            *(self._replicated(t) for t in (u_rows, u_ids, fresh, counts)),
            self._batch(inv),
            self._batch(labels),
            member,
            noise,
            self._replicated(self.field_mask),
            *(tf.constant(r, tf.float32) for r in (lr_dense, lr_emb, l2)),
        )

    def train_step(
        self, rows, ids, fresh, counts, inv, labels, member, noise, field_mask, lr_dense, lr_emb, l2
    ):
        c, s = self.config, self.sparse
        E_u, w_u, moments = s.gather(rows, ids, fresh, c.init_scale)
        gate_vars = [self.gates.logits] if self.gated else []
        with tf.GradientTape() as tape:
            tape.watch([E_u, w_u])
            z = field_mask[None, :]  # [1, F]
            if self.gated:
                z = z * self.gates.values(member, noise, c.gate_temperature)  # [B, F]
            emb = tf.gather(E_u, inv) * z[:, :, None]  # [B, F, D]
            lin = tf.gather(w_u[:, 0], inv) * z  # [B, F]
            logits = self.model(emb, lin)  # [B]
            bce = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
            present = tf.cast(counts > 0, tf.float32) * tf.cast(rows > 0, tf.float32)
            loss = bce + l2 * tf.reduce_sum(present[:, None] * tf.square(E_u))
            if self.gated:
                loss += c.gate_penalty * tf.reduce_sum(tf.reduce_mean(tf.sigmoid(self.gates.logits), axis=0))
        g_E, g_w, *g_dense = tape.gradient(
            loss,
            [E_u, w_u, *self.model.weights, *gate_vars],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        g_E, g_w = tf.convert_to_tensor(g_E), tf.convert_to_tensor(g_w)
        if c.optimizer == "cowclip":
            g_E = cowclip(g_E, E_u, counts, c.cowclip_ratio, c.cowclip_zeta)
            g_w = cowclip(g_w, w_u, counts, c.cowclip_ratio, c.cowclip_zeta)
        # Every read above, every write below (see models/optim.Adam): lazy Adam on the batch's rows.
        valid = tf.cast(rows > 0, tf.float32)[:, None]  # the null row is never trained
        new = {}
        for name, value, g in (("E", E_u, g_E), ("w", w_u, g_w)):
            m, v = moments["m" + name], moments["v" + name]
            value, m, v = adam_rows(value, m, v, g, learning_rate=lr_emb, step=self.step)
            new[name], new["m" + name], new["v" + name] = value * valid, m * valid, v * valid
        s.write(rows, new)
        n = len(self.model.weights)
        self.dense_opt.apply(g_dense[:n], self.model.weights, learning_rate=lr_dense)
        if self.gated:
            self.gate_opt.apply(g_dense[n:], gate_vars)
        self.step.assign(self.step + 1)
        return {"loss": bce, "lr/dense": lr_dense}

    def after_step(self, fit: loop.Fit, batch, scalars) -> None:
        c = self.config
        if c.expire_steps and fit.step % c.expire_every == 0:
            self.table.expire(tf.constant(fit.step + self.clock_offset, tf.int64))

    # -- evaluation and outputs -------------------------------------------------------------------

    def gate_mean(self) -> np.ndarray | None:
        return None if self.gates is None else self.gates.probability().mean(axis=0)

    def field_weight(self) -> np.ndarray:
        """Per-field weights at evaluation and serving: the selected-field mask times the gates' mean."""
        gate = self.gate_mean()
        return self.field_mask * (np.ones_like(self.field_mask) if gate is None else gate)

    def predict_step(self, rows, field_weight):
        emb, lin = self.sparse.lookup(rows)  # [B, F, D], [B, F]
        return tf.sigmoid(self.model(emb * field_weight[None, :, None], lin * field_weight[None, :]))

    def evaluate(self, fit: loop.Fit) -> dict:
        c = self.config
        weight = self._replicated(self.field_weight())

        def place(batch):
            return self._batch(self.table.lookup(self.ids(batch))), weight

        labels, probs = [], []
        for batch, p in fit.predict(ctr_data.dataset(c.data, "eval", c.eval_batch_size), place):
            probs.append(p)
            labels.append(batch["label"].numpy())
        y, p = np.concatenate(labels), np.concatenate(probs)
        return {"auc": metrics_lib.auc(y, p), "logloss": metrics_lib.logloss(y, p), "eval_examples": len(y)}

    def metrics(self, result: loop.FitResult) -> dict:
        trained = result.steps - result.start_step
        return {
            "seconds_per_epoch": result.train_seconds / max(trained / self.steps_per_epoch(), 1e-9)
            if trained
            else 0.0,
            "auc_history": [(s, m["auc"]) for s, m in result.eval_history],
            **self.table.counters(),
            "model": self.config.model,
            "optimizer": self.config.optimizer,
            "batch_size": self.config.batch_size,
        }

    def title(self, metrics) -> str:
        return f"{self.config.model}: eval AUC {metrics.get('auc', float('nan')):.4f}"

    def serving_copy(self, logit_shift: float = 0.0) -> ServingCTR:
        return ServingCTR.from_state(self.model, self.table, self.sparse, self.field_weight(), logit_shift)

    def export(self, directory: Path) -> None:
        save_serving(self.serving_copy(), directory)
