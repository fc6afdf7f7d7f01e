"""The one training loop: a task of twenty lines gets outputs, checkpoints, resume, staging and padded eval.

`LinearTask` is the example of docs/architecture.md, verbatim."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from headrace.core import mesh as mesh_lib
from headrace.core.errors import HeadraceError, InputError
from headrace.models.optim import Adam
from headrace.pipelines import example
from headrace.runners import loop


@dataclasses.dataclass(frozen=True)
class LinearConfig(loop.TrainConfig):  # data, output, mesh, seed, resume, checkpoints...
    batch_size: int = 256
    steps: int = 200
    learning_rate: float = 0.01


class LinearTask(loop.Task):
    name = "linear"

    def build(self, mesh):
        self.w = mesh_lib.variable(mesh_lib.initial_value((4, 1), seed=1), mesh_lib.layout(mesh, None, None))
        self.optimizer = Adam([self.w], learning_rate=self.config.learning_rate)

    def dataset(self, epoch):
        return example.dataset(
            self.config.data, "train", self.config.batch_size, repeat=True, drop_remainder=True
        )

    def place(self, batch, step):
        return mesh_lib.shard_batch(self.mesh, batch["dense"]), mesh_lib.shard_batch(
            self.mesh, batch["label"]
        )

    def train_step(self, x, y):  # traced once by fit
        with tf.GradientTape() as tape:
            logits = tf.squeeze(tf.matmul(x, self.w), 1)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(y, tf.float32), logits))
        self.optimizer.apply(tape.gradient(loss, [self.w]), [self.w])
        return {"loss": loss}

    def checkpoint_groups(self):
        return {"": {"w": self.w, "optimizer": self.optimizer}}


class EvaluatedTask(LinearTask):
    """With a held-out evaluation whose batches (100) do not divide over the mesh's batch dimension."""

    def predict_step(self, x):
        return tf.sigmoid(tf.squeeze(tf.matmul(x, self.w), 1))

    def evaluate(self, fit):
        pairs = list(fit.predict(example.dataset(self.config.data, "eval", 100), self._place_eval))
        self.eval_pairs = pairs
        y = np.concatenate([b["label"].numpy() for b, _ in pairs])
        p = np.concatenate([p for _, p in pairs])
        return {"eval_examples": len(y), "logloss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))}

    def _place_eval(self, batch):
        return (mesh_lib.shard_batch(self.mesh, batch["dense"]),)


def test_the_documented_example_is_this_one():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    for cls in (LinearConfig, LinearTask):
        assert inspect.getsource(cls) in doc, cls.__name__


def test_the_documented_task_trains_and_gets_every_output(example_output, tmp_path):
    config = LinearConfig(data=str(example_output), output=str(tmp_path / "linear"), mesh="batch=8", steps=60)
    metrics = loop.fit(LinearTask(config))
    out = tmp_path / "linear"
    assert metrics["steps"] == 60 and metrics["loss_last"] < metrics["loss_first"] - 0.05
    assert json.loads((out / "metrics.json").read_text())["steps"] == 60
    assert json.loads((out / "resolved_config.json").read_text())["steps"] == 60
    assert (out / "curves.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert list((out / "checkpoint").glob("ckpt-60.index"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear"]  # no staging directory left


def test_a_failed_run_leaves_no_output_and_resume_continues_exactly(example_output, tmp_path):
    common = dict(data=str(example_output), output=str(tmp_path / "run"), mesh="batch=4,model=2")
    straight = loop.fit(LinearTask(LinearConfig(**{**common, "output": str(tmp_path / "straight")}, steps=8)))

    class Crashes(LinearTask):
        def after_step(self, fit, batch, scalars):
            if fit.step == 6:
                raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        loop.fit(Crashes(LinearConfig(**common, steps=8, checkpoint_every=4)))
    assert not (tmp_path / "run").exists()  # nothing half-written where the output goes
    assert list((tmp_path / ".run.partial" / "checkpoint").glob("ckpt-4.index"))  # kept for --resume
    resumed = loop.fit(LinearTask(LinearConfig(**common, steps=8, resume=True)))
    assert resumed["steps"] == 8 and not (tmp_path / ".run.partial").exists()
    # Steps 5..8 after the restore are the same steps as in the uninterrupted run.
    assert resumed["loss_last"] == pytest.approx(
        np.mean(straight_losses(tmp_path / "straight")[4:]), abs=1e-6
    )
    assert straight["steps"] == 8


def straight_losses(out) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    return [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("loss")]


def test_eval_batches_are_padded_to_the_mesh_and_cut_back(example_output, tmp_path):
    config = LinearConfig(data=str(example_output), output=str(tmp_path / "m"), mesh="batch=8", steps=5)
    task = EvaluatedTask(config)
    metrics = loop.fit(task)
    n_eval = json.loads((example_output / "report.json").read_text())["eval"]
    assert metrics["eval_examples"] == n_eval and n_eval % 8  # the last batch needed padding
    w = mesh_lib.to_numpy(task.w)
    for batch, p in task.eval_pairs:
        expected = 1 / (1 + np.exp(-(batch["dense"].numpy() @ w)[:, 0]))
        assert p.shape == (len(expected),)
        np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-6)


class Stream(loop.Task):
    """Batches with idle ticks between them; never staged, like a trainer that runs forever."""

    name = "stream"
    staged = False

    def build(self, mesh):
        self.w = tf.Variable(0.0)
        self.synced = []

    def batches(self, step):
        for k in range(4):
            yield None  # nothing arrived yet
            yield np.float32(k)

    def place(self, batch, step):
        return (tf.constant(batch),)

    def train_step(self, x):
        self.w.assign_add(x)
        return {"loss": self.w.read_value()}

    def periodic(self):
        return [(0.0, lambda fit: self.synced.append(fit.step))]

    def total_steps(self):
        return None


def test_a_stream_runs_periodic_work_on_idle_ticks_and_trains_in_place(tmp_path):
    task = Stream(loop.TrainConfig(output=str(tmp_path / "live"), mesh=""))
    metrics = loop.fit(task)
    assert metrics["steps"] == 4 and float(task.w.numpy()) == 0 + 1 + 2 + 3
    assert task.synced == [0, 1, 1, 2, 2, 3, 3, 4]  # after every tick and every step
    assert (tmp_path / "live" / "metrics.json").is_file() and not list(tmp_path.glob(".*partial"))


def test_input_that_ends_early_and_a_diverged_loss_are_errors(example_output, tmp_path):
    class Short(LinearTask):
        def dataset(self, epoch):
            return example.dataset(self.config.data, "train", 256, drop_remainder=True).take(3)

    config = LinearConfig(data=str(example_output), output=str(tmp_path / "short"), mesh="batch=8", steps=10)
    with pytest.raises(InputError, match="ended after 3 of 10 steps"):
        loop.fit(Short(config))

    class Diverges(LinearTask):
        def train_step(self, x, y):
            return {"loss": super().train_step(x, y)["loss"] * np.inf}

    with pytest.raises(HeadraceError, match="diverged"):
        loop.fit(Diverges(dataclasses.replace(config, output=str(tmp_path / "nan"), steps=2)))
    assert not (tmp_path / "short").exists() and not (tmp_path / "nan").exists()
