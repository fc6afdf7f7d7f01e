"""``headrace train crowd-classifier``: learn a text classifier from the crowd-labels pipeline's posteriors.

    headrace train crowd-classifier --data OUT --output M [--mesh batch=4,model=2] [--epochs E]

Reads ``OUT/tasks-train-*.tfrecord`` (task, text, posterior) written by ``headrace run crowd-labels
--tasks T.csv``, trains `headrace.models.text_classifier.TextClassifier` on the posteriors as soft labels,
and evaluates on the held-out ``OUT/tasks-eval-*.tfrecord``: accuracy against the aggregated label, and
against the true label where the pipeline was given ``--truth``.

Writes ``M/metrics.json``, ``M/curves.png``, TensorBoard summaries, a checkpoint, and
``M/predictions.csv`` (task plus one probability column per class, for every task), which
``headrace run crowd-labels --task-priors M/predictions.csv`` uses as each task's prior in the EM.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from headrace.models import metrics
from headrace.models.text_classifier import TextClassifier, TextClassifierConfig, text_to_ids
from headrace.pipelines.crowd import crowd_task_spec
from headrace.runners import config as config_lib
from headrace.runners import mesh as mesh_lib
from headrace.runners.errors import InputError
from headrace.runners.training import Adam, Progress, Summaries, plot_curves, write_json
from headrace.transforms.tfrecord import list_shards, tfrecord_dataset

__all__ = ["CrowdClassifierConfig", "train_and_evaluate"]

_log = logging.getLogger("headrace.train")


@dataclasses.dataclass(frozen=True)
class CrowdClassifierConfig:
    data: str = dataclasses.field(default="", metadata={"help": "output of `run crowd-labels --tasks`"})
    output: str = ""
    mesh: str = "batch=4,model=2"
    batch_size: int = 64
    epochs: int = 8
    learning_rate: float = 0.01
    seed: int = 0
    log_every_seconds: float = 5.0
    model: TextClassifierConfig = dataclasses.field(default_factory=TextClassifierConfig)


@config_lib.register("crowd-classifier", command="train crowd-classifier")
def crowd_classifier() -> CrowdClassifierConfig:
    """Bag-of-n-grams classifier on crowd posteriors, batch=4,model=2 mesh, 8 epochs."""
    return CrowdClassifierConfig()


def _classes(data: str) -> list[str]:
    report = Path(data) / "report.json"
    if not report.exists():
        raise InputError(f"--data {data}: no report.json (is it the output of `headrace run crowd-labels`?)")
    return json.loads(report.read_text())["classes"]


def _shards(data: str, split: str) -> list[str]:
    try:
        return list_shards(f"{data}/tasks-{split}-*.tfrecord")
    except InputError:
        raise InputError(
            f"--data {data}: no tasks-{split}-*.tfrecord shards; run crowd-labels with --tasks T.csv"
        ) from None


def _dataset(data: str, split: str, num_classes: int, model: TextClassifierConfig, batch: int, **kw):
    pattern = _shards(data, split)
    spec = crowd_task_spec(num_classes)

    def features(b):
        return {
            "ids": text_to_ids(b["text"], model.buckets, model.max_tokens),
            "posterior": b["posterior"],
            "label": b["label"],
            "truth": b["truth"],
            "task": b["task"],
        }

    return tfrecord_dataset(pattern, spec, batch, **kw).map(features, num_parallel_calls=tf.data.AUTOTUNE)


def _pad(batch: dict, multiple: int) -> tuple[dict, int]:
    n = int(batch["posterior"].shape[0])
    pad = (-n) % multiple
    if pad:
        batch = {k: tf.concat([v, tf.repeat(v[-1:], pad, axis=0)], axis=0) for k, v in batch.items()}
    return batch, n


def train_and_evaluate(config: CrowdClassifierConfig) -> dict:
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    classes = _classes(config.data)
    model_config = dataclasses.replace(config.model, num_classes=len(classes))
    config = dataclasses.replace(config, model=model_config)
    config_lib.dump(config, out / "resolved_config.json")
    mesh = mesh_lib.create_mesh(config.mesh)
    batch_dim = mesh.dim_size("batch") if "batch" in mesh.dim_names else 1

    n_train = sum(1 for f in _shards(config.data, "train") for _ in tf.data.TFRecordDataset(f))
    steps_per_epoch = max(1, n_train // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    model = TextClassifier(model_config, mesh)
    optimizer = Adam(model.weights, learning_rate=config.learning_rate)

    @tf.function
    def train_step(ids, soft):
        with tf.GradientTape() as tape:
            loss = model.loss(ids, soft)
        grads = tape.gradient(loss, model.weights)
        optimizer.apply(grads, model.weights)
        return loss

    @tf.function
    def predict(ids):
        return tf.nn.softmax(model(ids), axis=-1)

    train = _dataset(
        config.data,
        "train",
        len(classes),
        model_config,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        repeat=True,
        drop_remainder=True,
    )
    summaries = Summaries(out / "tensorboard")
    progress = Progress(total_steps, config.batch_size, config.log_every_seconds, name="crowd-classifier")
    losses = []
    start = time.perf_counter()
    for step, batch in enumerate(train.take(total_steps), start=1):
        loss = train_step(
            mesh_lib.shard_batch(mesh, batch["ids"]), mesh_lib.shard_batch(mesh, batch["posterior"])
        )
        losses.append(float(mesh_lib.to_numpy(loss)))
        summaries.scalars(step, {"loss": losses[-1]})
        progress.update(step, {"loss": losses[-1]}, force=step == total_steps)
    seconds = time.perf_counter() - start

    def run(split: str):
        rows = {"task": [], "p": [], "label": [], "truth": []}
        for batch in _dataset(config.data, split, len(classes), model_config, config.batch_size):
            padded, n = _pad(batch, batch_dim)
            p = mesh_lib.to_numpy(predict(mesh_lib.shard_batch(mesh, padded["ids"])))[:n]
            rows["p"].append(p)
            rows["task"] += [t.decode() for t in batch["task"].numpy()]
            rows["label"].append(batch["label"].numpy())
            rows["truth"].append(batch["truth"].numpy())
        return (
            rows["task"],
            np.concatenate(rows["p"]),
            np.concatenate(rows["label"]),
            np.concatenate(rows["truth"]),
        )

    tasks, p, label, truth = run("eval")
    pred = p.argmax(axis=1)
    known = truth >= 0
    result = {
        "classes": classes,
        "train_tasks": n_train,
        "eval_tasks": len(tasks),
        "steps": len(losses),
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-steps_per_epoch:])),
        "accuracy_vs_aggregated": metrics.accuracy(label, pred),
        "accuracy_vs_truth": metrics.accuracy(truth[known], pred[known]) if known.any() else None,
        "aggregated_accuracy_vs_truth": metrics.accuracy(truth[known], label[known]) if known.any() else None,
        "examples_per_sec": len(losses) * config.batch_size / seconds,
        "mesh": config.mesh,
        "device_type": mesh.device_type(),
    }
    summaries.scalars(len(losses), {"eval/accuracy_vs_aggregated": result["accuracy_vs_aggregated"]})
    summaries.close()

    train_tasks, train_p, _, _ = run("train")
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", *classes])
        for t, row in zip(train_tasks + tasks, np.concatenate([train_p, p])):
            writer.writerow([t, *(f"{v:.6g}" for v in row)])
    write_json(out / "metrics.json", result)
    plot_curves(
        out / "curves.png",
        {"train loss": (range(1, len(losses) + 1), losses)},
        title=f"crowd-classifier: eval accuracy {result['accuracy_vs_aggregated']:.3f} vs aggregated labels",
    )
    tf.train.Checkpoint(model=model, optimizer=optimizer).write(str(out / "checkpoint" / "ckpt"))
    _log.info(
        "crowd-classifier: eval accuracy %.4f vs aggregated, %s vs truth (%d tasks)",
        result["accuracy_vs_aggregated"],
        "n/a" if result["accuracy_vs_truth"] is None else f"{result['accuracy_vs_truth']:.4f}",
        len(tasks),
    )
    if not math.isfinite(losses[-1]):
        raise RuntimeError("training diverged (non-finite loss)")
    return result
