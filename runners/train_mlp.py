"""``headrace train mlp``: the example model trained on the example pipeline's shards on a DTensor mesh.

    headrace train mlp --data OUT --output M [--mesh batch=4,model=2] [--steps N] [--batch-size B]

Reads ``OUT/train-*.tfrecord`` with the reader the example pipeline derives from its feature spec
(`headrace.pipelines.example.dataset`), trains `headrace.models.mlp.MLP` data- and model-parallel,
evaluates AUC / log loss / accuracy on ``OUT/eval-*.tfrecord`` and writes ``M/metrics.json``,
``M/curves.png``, TensorBoard summaries under ``M/tensorboard``, a checkpoint under ``M/checkpoint`` and
``M/resolved_config.json`` (the loop: `headrace.runners.loop`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from headrace.core import cluster
from headrace.core import config as config_lib
from headrace.core import mesh as mesh_lib
from headrace.models import metrics
from headrace.models.mlp import MLP, MLPConfig
from headrace.models.optim import Adam
from headrace.pipelines import example
from headrace.runners import loop

__all__ = ["MLPTask", "MLPTrainConfig", "to_model_inputs", "train_and_evaluate"]


@dataclasses.dataclass(frozen=True)
class MLPTrainConfig(loop.TrainConfig):
    data: str = dataclasses.field(default="", metadata={"help": "output of `headrace run example`"})
    batch_size: int = 256
    steps: int = 300
    learning_rate: float = 0.01
    max_tokens: int = 8
    log_every_seconds: float = 5.0
    model: MLPConfig = dataclasses.field(default_factory=MLPConfig)


@config_lib.register("mlp", command="train mlp")
def mlp() -> MLPTrainConfig:
    """The example MLP on the example shards, batch=4,model=2 mesh, 300 steps."""
    return MLPTrainConfig()


def to_model_inputs(batch: dict, max_tokens: int) -> dict:
    """Parsed example batch -> dense tensors (ragged tokens padded with -1 to `max_tokens`)."""
    tokens = batch["tokens"].to_tensor(default_value=-1, shape=[None, max_tokens])
    return {"dense": batch["dense"], "tokens": tokens, "label": batch["label"]}


class MLPTask(loop.Task):
    name = "mlp"

    def build(self, mesh) -> None:
        self.model = MLP(self.config.model, mesh)
        self.optimizer = Adam(self.model.weights, learning_rate=self.config.learning_rate)

    def checkpoint_groups(self):
        return {"": {"model": self.model, "optimizer": self.optimizer}}

    def _inputs(self, split: str, **kwargs):
        c = self.config
        ds = example.dataset(c.data, split, c.batch_size, **kwargs)
        return ds.map(lambda b: to_model_inputs(b, c.max_tokens))

    def dataset(self, epoch: int):
        return self._inputs(
            "train", shuffle=True, seed=self.config.seed, repeat=True, drop_remainder=True,
            share=cluster.input_share(self.config),
        )  # fmt: skip

    def place(self, batch, step: int):
        return ({k: mesh_lib.shard_batch(self.mesh, v) for k, v in batch.items()},)

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            loss = self.model.loss(batch)
        self.optimizer.apply(tape.gradient(loss, self.model.weights), self.model.weights)
        return {"loss": loss}

    def predict_step(self, dense, tokens):
        return tf.sigmoid(self.model(dense, tokens))

    def evaluate(self, fit: loop.Fit) -> dict:
        def place(b):
            return mesh_lib.shard_batch(self.mesh, b["dense"]), mesh_lib.shard_batch(self.mesh, b["tokens"])

        pairs = list(fit.predict(self._inputs("eval"), place))
        y = np.concatenate([b["label"].numpy() for b, _ in pairs])
        p = np.concatenate([p for _, p in pairs])
        return {
            "eval_examples": len(y),
            "auc": metrics.auc(y, p),
            "logloss": metrics.logloss(y, p),
            "accuracy": metrics.accuracy(y, p > 0.5),
        }

    def title(self, m) -> str:
        return f"mlp on {self.config.mesh}: eval AUC {m['auc']:.3f}"


def train_and_evaluate(config: MLPTrainConfig) -> dict:
    """Trains, evaluates and writes the run's files; returns the metrics."""
    return loop.fit(MLPTask(config))
