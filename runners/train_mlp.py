"""``headrace train mlp``: the example model trained on the example pipeline's shards on a DTensor mesh.

    headrace train mlp --data OUT --output M [--mesh batch=4,model=2] [--steps N] [--batch-size B]

Reads ``OUT/train-*.tfrecord`` with the tf.data reader built from the pipeline's feature spec, trains
`headrace.models.mlp.MLP` data- and model-parallel, evaluates AUC / log loss / accuracy on
``OUT/eval-*.tfrecord`` and writes ``M/metrics.json``, ``M/curves.png``, TensorBoard summaries under
``M/tensorboard``, a checkpoint under ``M/checkpoint`` and ``M/resolved_config.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from headrace.models import metrics
from headrace.models.mlp import MLP, MLPConfig
from headrace.pipelines.example import EXAMPLE_SPEC
from headrace.runners import config as config_lib
from headrace.runners import mesh as mesh_lib
from headrace.runners.training import Adam, Progress, Summaries, plot_curves, write_json
from headrace.transforms.tfrecord import tfrecord_dataset

__all__ = ["MLPTrainConfig", "to_model_inputs", "train_and_evaluate"]

_log = logging.getLogger("headrace.train")


@dataclasses.dataclass(frozen=True)
class MLPTrainConfig:
    data: str = ""
    output: str = ""
    mesh: str = "batch=4,model=2"
    batch_size: int = 256
    steps: int = 300
    learning_rate: float = 0.01
    max_tokens: int = 8
    seed: int = 0
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


def _pad_to_multiple(inputs: dict, multiple: int) -> tuple[dict, int]:
    n = int(inputs["label"].shape[0])
    pad = (-n) % multiple
    if pad:
        inputs = {k: tf.concat([v, tf.repeat(v[-1:], pad, axis=0)], axis=0) for k, v in inputs.items()}
    return inputs, n


def train_and_evaluate(config: MLPTrainConfig) -> dict:
    """Trains, evaluates and writes the run's files; returns the metrics dict."""
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.dump(config, out / "resolved_config.json")
    mesh = mesh_lib.create_mesh(config.mesh)
    batch_dim = mesh.dim_size("batch") if "batch" in mesh.dim_names else 1

    model = MLP(config.model, mesh)
    variables = [model.embedding, model.w1, model.b1, model.w2, model.b2]
    optimizer = Adam(variables, learning_rate=config.learning_rate)

    @tf.function
    def train_step(batch):
        with tf.GradientTape() as tape:
            loss = model.loss(batch)
        grads = tape.gradient(loss, variables)
        optimizer.apply(grads, variables)
        return loss

    @tf.function
    def predict(dense, tokens):
        return tf.sigmoid(model(dense, tokens))

    train = tfrecord_dataset(
        f"{config.data}/train-*.tfrecord",
        EXAMPLE_SPEC,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        repeat=True,
        drop_remainder=True,
    ).map(lambda b: to_model_inputs(b, config.max_tokens))

    summaries = Summaries(out / "tensorboard")
    progress = Progress(config.steps, config.batch_size, config.log_every_seconds, name="mlp")
    losses = []
    start = time.perf_counter()
    for step, batch in enumerate(train.take(config.steps), start=1):
        sharded = {k: mesh_lib.shard_batch(mesh, v) for k, v in batch.items()}
        loss = float(mesh_lib.to_numpy(train_step(sharded)))
        losses.append(loss)
        summaries.scalars(step, {"loss": loss})
        progress.update(step, {"loss": loss}, force=step == config.steps)
    train_seconds = time.perf_counter() - start

    labels, scores = [], []
    evals = tfrecord_dataset(f"{config.data}/eval-*.tfrecord", EXAMPLE_SPEC, config.batch_size)
    for batch in evals:
        inputs, n = _pad_to_multiple(to_model_inputs(batch, config.max_tokens), batch_dim)
        p = predict(
            mesh_lib.shard_batch(mesh, inputs["dense"]),
            mesh_lib.shard_batch(mesh, inputs["tokens"]),
        )
        scores.append(mesh_lib.to_numpy(p)[:n])
        labels.append(inputs["label"].numpy()[:n])
    y, p = np.concatenate(labels), np.concatenate(scores)
    result = {
        "steps": len(losses),
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-20:])),
        "eval_examples": len(y),
        "auc": metrics.auc(y, p),
        "logloss": metrics.logloss(y, p),
        "accuracy": metrics.accuracy(y, p > 0.5),
        "examples_per_sec": len(losses) * config.batch_size / train_seconds,
        "train_seconds": train_seconds,
        "mesh": config.mesh,
        "devices": mesh.num_local_devices(),
        "device_type": mesh.device_type(),
    }
    summaries.scalars(len(losses), {"eval/auc": result["auc"], "eval/logloss": result["logloss"]})
    summaries.close()
    write_json(out / "metrics.json", result)
    plot_curves(
        out / "curves.png",
        {"train loss": (range(1, len(losses) + 1), losses)},
        title=f"mlp on {config.mesh}: eval AUC {result['auc']:.3f}",
    )
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    checkpoint.write(str(out / "checkpoint" / "ckpt"))
    _log.info("mlp: eval auc=%.4f logloss=%.4f (%d examples)", result["auc"], result["logloss"], len(y))
    return result
