"""``headrace train crowd-classifier``: learn a text classifier from the crowd-labels pipeline's posteriors.

    headrace train crowd-classifier --data OUT --output M [--mesh batch=4,model=2] [--epochs E]

Reads ``OUT/tasks-train-*.tfrecord`` (task, text, posterior) written by ``headrace run crowd-labels
--tasks T.csv`` (`headrace.pipelines.crowd.dataset`), trains
`headrace.models.text_classifier.TextClassifier` on the posteriors as soft labels, and evaluates on the
held-out ``OUT/tasks-eval-*.tfrecord``: accuracy against the aggregated label, and against the true label
where the pipeline was given ``--truth``.

Writes ``M/metrics.json``, ``M/curves.png``, TensorBoard summaries, a checkpoint, and
``M/predictions.csv`` (task plus one probability column per class, for every task), which
``headrace run crowd-labels --task-priors M/predictions.csv`` uses as each task's prior in the EM.

A prior must not come from a model that learned that task's own posterior, or the EM counts the task's
annotations twice. So the train tasks' predictions are out of fold: `folds` more models are trained,
each without one fold of the train tasks (by a hash of the task id), and each predicts the fold it
did not see. The eval tasks' predictions come from the main model, which never saw them either.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from headrace.core import cluster
from headrace.core import config as config_lib
from headrace.core import mesh as mesh_lib
from headrace.core.errors import ConfigError, InputError
from headrace.models import metrics
from headrace.models.optim import Adam
from headrace.models.text_classifier import TextClassifier, TextClassifierConfig, text_to_ids
from headrace.pipelines import crowd
from headrace.runners import loop

__all__ = ["CrowdClassifierConfig", "CrowdClassifierTask", "train_and_evaluate"]

_log = logging.getLogger("headrace.train")


@dataclasses.dataclass(frozen=True)
class CrowdClassifierConfig(loop.TrainConfig):
    data: str = dataclasses.field(default="", metadata={"help": "output of `run crowd-labels --tasks`"})
    batch_size: int = 64
    epochs: int = 8
    learning_rate: float = 0.01
    log_every_seconds: float = 5.0
    folds: int = dataclasses.field(
        default=5, metadata={"help": "k of the out-of-fold predictions for train tasks (0: in-sample)"}
    )
    model: TextClassifierConfig = dataclasses.field(default_factory=TextClassifierConfig)


@config_lib.register("crowd-classifier", command="train crowd-classifier")
def crowd_classifier() -> CrowdClassifierConfig:
    """Bag-of-n-grams classifier on crowd posteriors, batch=4,model=2 mesh, 8 epochs."""
    return CrowdClassifierConfig()


def _report(data: str) -> dict:
    report = Path(data) / "report.json"
    if not report.exists():
        raise InputError(f"--data {data}: no report.json (is it the output of `headrace run crowd-labels`?)")
    return json.loads(report.read_text())


class CrowdClassifierTask(loop.Task):
    name = "crowd-classifier"

    def __init__(
        self,
        config: CrowdClassifierConfig,
        classes: list[str],
        train_tasks: int,
        fold: tuple[int, int] | None = None,
    ):
        super().__init__(config)
        self.classes, self.train_tasks = classes, train_tasks
        self.fold = fold  # (f, k): train without fold f of k, predict fold f
        self.out_of_fold: dict[str, np.ndarray] = {}  # task -> probabilities, from the fold models
        seen = train_tasks * (fold[1] - 1) // fold[1] if fold else train_tasks
        # One shuffled stream repeated over the epochs (batches may straddle two); loss_last is the mean
        # of the last epoch's steps.
        self.epoch_steps = self.loss_window = max(1, seen // config.batch_size)
        if fold:
            self.name = f"crowd-classifier fold {fold[0] + 1}/{fold[1]}"

    def build(self, mesh) -> None:
        self.model = TextClassifier(self.config.model, mesh)
        self.optimizer = Adam(self.model.weights, learning_rate=self.config.learning_rate)

    def checkpoint_groups(self):
        return {"": {"model": self.model, "optimizer": self.optimizer}}

    def total_steps(self) -> int:
        return self.epoch_steps * self.config.epochs

    def _inputs(self, split: str, in_fold: bool | None = None, **kwargs):
        c, m = self.config, self.config.model

        def features(b):
            return {
                "ids": text_to_ids(b["text"], m.buckets, m.max_tokens),
                "posterior": b["posterior"],
                "label": b["label"],
                "truth": b["truth"],
                "task": b["task"],
            }

        ds = crowd.dataset(c.data, split, c.batch_size, **kwargs)
        if in_fold is not None:  # only the tasks of (in_fold=True) or outside (False) this task's fold
            f, k = self.fold
            drop = bool(kwargs.get("drop_remainder", False))
            ds = (
                ds.unbatch()
                .filter(lambda r: tf.equal(tf.strings.to_hash_bucket_fast(r["task"], k) == f, in_fold))
                .batch(c.batch_size, drop_remainder=drop)
            )
        return ds.map(features, num_parallel_calls=tf.data.AUTOTUNE)

    def dataset(self, epoch: int):
        return self._inputs(
            "train",
            in_fold=False if self.fold else None,
            shuffle=True,
            seed=self.config.seed,
            repeat=True,
            drop_remainder=True,
            share=cluster.input_share(self.config),
        )

    def place(self, batch, step: int):
        return mesh_lib.shard_batch(self.mesh, batch["ids"]), mesh_lib.shard_batch(
            self.mesh, batch["posterior"]
        )

    def train_step(self, ids, soft):
        with tf.GradientTape() as tape:
            loss = self.model.loss(ids, soft)
        self.optimizer.apply(tape.gradient(loss, self.model.weights), self.model.weights)
        return {"loss": loss}

    def predict_step(self, ids):
        return tf.nn.softmax(self.model(ids), axis=-1)

    def predict(self, fit: loop.Fit, split: str, in_fold: bool | None = None):
        """(tasks, probabilities [N, K], aggregated labels [N], truth [N]) of a split."""
        rows = {"task": [], "p": [], "label": [], "truth": []}
        for batch, p in fit.predict(
            self._inputs(split, in_fold), lambda b: (mesh_lib.shard_batch(self.mesh, b["ids"]),)
        ):
            rows["p"].append(p)
            rows["task"] += [t.decode() for t in batch["task"].numpy()]
            rows["label"].append(batch["label"].numpy())
            rows["truth"].append(batch["truth"].numpy())
        return rows["task"], *(np.concatenate(rows[k]) for k in ("p", "label", "truth"))

    def evaluate(self, fit: loop.Fit) -> dict:
        if self.fold:  # a fold model: its predictions for the fold it did not see
            tasks, p, _, _ = self.predict(fit, "train", in_fold=True)
            self.out_of_fold = dict(zip(tasks, p))
            return {"fold_tasks": len(tasks)}
        tasks, p, label, truth = self.predict(fit, "eval")
        pred, known = p.argmax(axis=1), truth >= 0
        self._predictions = {"eval": (tasks, p), "train": self.predict(fit, "train")[:2]}
        return {
            "eval_tasks": len(tasks),
            "accuracy_vs_aggregated": metrics.accuracy(label, pred),
            "accuracy_vs_truth": metrics.accuracy(truth[known], pred[known]) if known.any() else None,
            "aggregated_accuracy_vs_truth": metrics.accuracy(truth[known], label[known])
            if known.any()
            else None,
        }

    def metrics(self, result: loop.FitResult) -> dict:
        k = self.config.folds
        priors = f"out-of-fold ({k} folds)" if self.out_of_fold else "in-sample"
        return {"classes": self.classes, "train_tasks": self.train_tasks, "train_predictions": priors}

    def write_outputs(self, directory: Path, result: loop.FitResult, m: dict) -> None:
        """predictions.csv: every task, train (out of fold) and eval, one probability column per class."""
        (train_tasks, train_p), (eval_tasks, eval_p) = self._predictions["train"], self._predictions["eval"]
        if self.out_of_fold:
            missing = [t for t in train_tasks if t not in self.out_of_fold]
            if missing:
                raise RuntimeError(
                    f"{len(missing)} train tasks have no out-of-fold prediction: {missing[:3]}"
                )
            train_p = np.stack([self.out_of_fold[t] for t in train_tasks])
        with open(directory / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["task", *self.classes])
            for t, row in zip(train_tasks + eval_tasks, np.concatenate([train_p, eval_p])):
                writer.writerow([t, *(f"{v:.6g}" for v in row)])
        _log.info(
            "crowd-classifier: eval accuracy %.4f vs aggregated, %s vs truth (%d tasks)",
            m["accuracy_vs_aggregated"],
            "n/a" if m["accuracy_vs_truth"] is None else f"{m['accuracy_vs_truth']:.4f}",
            m["eval_tasks"],
        )

    def title(self, m) -> str:
        return f"crowd-classifier: eval accuracy {m['accuracy_vs_aggregated']:.3f} vs aggregated labels"


def train_and_evaluate(config: CrowdClassifierConfig) -> dict:
    report = _report(config.data)
    classes = report["classes"]
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=len(classes)))
    train_tasks = report.get("tasks_file", {}).get("train")
    if train_tasks is None:
        raise InputError(f"--data {config.data}: no classifier shards; run crowd-labels with --tasks T.csv")
    if config.folds == 1 or config.folds < 0:
        raise ConfigError(f"--folds {config.folds}: 0 (in-sample predictions) or at least 2")
    main = CrowdClassifierTask(config, classes, train_tasks)
    with loop.Run(config) as run:
        for f in range(config.folds):
            fold = CrowdClassifierTask(config, classes, train_tasks, fold=(f, config.folds))
            run.train(fold, phase=f"fold{f}")
            main.out_of_fold.update(fold.out_of_fold)
        return run.finish(main, run.train(main))
