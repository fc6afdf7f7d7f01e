"""Pieces every DTensor training loop shares: an optimizer for (D)Variables, progress, summaries, plots.

`Adam` keeps its slots in the layout of the variable they belong to, so a model-parallel weight has
model-parallel moments and the update needs no communication. Keras optimizers are not used: Keras 3 has
no DTensor support.

`Progress` prints a log line every few seconds (step, loss, steps/s, examples/s, ETA); `Summaries` writes
TensorBoard scalars; `plot_curves` writes the PNG of loss and metric curves next to a run's metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

__all__ = ["Adam", "Progress", "Summaries", "layout_of", "plot_curves", "write_json", "zeros_like"]

_log = logging.getLogger("headrace.train")


def layout_of(value):
    """The DTensor layout of a tensor or variable, or None for plain TensorFlow values."""
    from tensorflow.experimental import dtensor

    try:
        return dtensor.fetch_layout(value)
    except Exception:
        return None


def zeros_like(variable, name: str | None = None, dtype=None):
    """A variable of zeros with the same shape and layout as `variable` (plain if it is plain)."""
    from tensorflow.experimental import dtensor

    dtype = dtype or variable.dtype
    lay = layout_of(variable)
    if lay is None:
        return tf.Variable(tf.zeros(variable.shape, dtype), trainable=False, name=name)
    return dtensor.DVariable(
        dtensor.call_with_layout(tf.zeros, lay, shape=variable.shape, dtype=dtype),
        trainable=False,
        name=name,
    )


def _scalar_variable(value, like, dtype, name):
    """A scalar variable on the same mesh as `like` (replicated), or plain."""
    from tensorflow.experimental import dtensor

    lay = layout_of(like)
    if lay is None:
        return tf.Variable(tf.constant(value, dtype), trainable=False, name=name)
    return dtensor.DVariable(
        dtensor.call_with_layout(
            tf.fill, dtensor.Layout.replicated(lay.mesh, 0), [], tf.constant(value, dtype)
        ),
        trainable=False,
        name=name,
    )


def _like(value, variable):
    """`value` relaid to `variable`'s layout (a no-op for plain variables)."""
    from tensorflow.experimental import dtensor

    lay = getattr(variable, "layout", None)
    return value if lay is None else dtensor.relayout(value, lay)


class Adam(tf.Module):
    """Adam (Kingma & Ba) with optional decoupled weight decay, for plain variables or DVariables.

        m_t = b1 m + (1 - b1) g          v_t = b2 v + (1 - b2) g²
        w  -= lr_t m_t / (sqrt(v_t) + eps) + lr wd w,   lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)

    Sparse (IndexedSlices) gradients are densified; models with large tables use their own sparse update.
    """

    def __init__(
        self,
        variables: Sequence[tf.Variable],
        learning_rate: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        weight_decay: float = 0.0,
        name: str = "adam",
    ):
        super().__init__(name=name)
        self.learning_rate = learning_rate
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.weight_decay = weight_decay
        self.iterations = _scalar_variable(0, variables[0], tf.int64, "iterations")
        self.m = [zeros_like(v, name=f"m_{i}") for i, v in enumerate(variables)]
        self.v = [zeros_like(v, name=f"v_{i}") for i, v in enumerate(variables)]

    def apply(self, grads: Sequence, variables: Sequence[tf.Variable], learning_rate=None) -> None:
        # Every new value is computed from reads made before any write, then written. Under DTensor
        # (TF 2.17), reading a DVariable after assigning it in the same tf.function and feeding the read
        # to another variable's assign silently drops that assign (found by the sharded-vs-unsharded
        # test of models/mlp.py: w1 stopped training while its moment kept updating).
        lr = self.learning_rate if learning_rate is None else learning_rate
        step = self.iterations + 1
        t = tf.cast(step, tf.float32)
        lr_t = lr * tf.sqrt(1.0 - tf.pow(self.beta2, t)) / (1.0 - tf.pow(self.beta1, t))
        writes = [(self.iterations, step)]
        for g, var, m, v in zip(grads, variables, self.m, self.v):
            if g is None:
                continue
            if isinstance(g, tf.IndexedSlices):
                g = tf.convert_to_tensor(g)
            new_m = self.beta1 * m + (1.0 - self.beta1) * g
            new_v = self.beta2 * v + (1.0 - self.beta2) * tf.square(g)
            update = lr_t * new_m / (tf.sqrt(new_v) + self.epsilon)
            if self.weight_decay:
                update += lr * self.weight_decay * var
            writes += [(m, new_m), (v, new_v), (var, var - update)]
        for target, value in writes:
            target.assign(_like(value, target))


class Progress:
    """Logs ``step N/total loss=... steps/s ex/s eta`` at most every `every_seconds`."""

    def __init__(self, total_steps: int | None, batch_size: int, every_seconds: float = 10.0, name="train"):
        self.total, self.batch_size, self.every = total_steps, batch_size, every_seconds
        self.name = name
        self.start = self.last = time.perf_counter()
        self.last_step = 0

    def update(self, step: int, metrics: Mapping[str, float], *, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        rate = (step - self.last_step) / max(now - self.last, 1e-9)
        parts = [f"{self.name} step {step}" + (f"/{self.total}" if self.total else "")]
        parts += [f"{k}={v:.4f}" for k, v in metrics.items()]
        parts.append(f"{rate:.1f} steps/s {rate * self.batch_size:.0f} ex/s")
        if self.total and rate > 0:
            parts.append(f"eta {_duration((self.total - step) / rate)}")
        _log.info(" ".join(parts))
        self.last, self.last_step = now, step

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Summaries:
    """TensorBoard scalars under ``LOGDIR`` (one writer per run; values are host numbers)."""

    def __init__(self, logdir: str | Path):
        self.writer = tf.summary.create_file_writer(str(logdir))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        with self.writer.as_default(step=step):
            for k, v in values.items():
                tf.summary.scalar(k, float(v))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def plot_curves(path: str | Path, curves: Mapping[str, tuple[Iterable[float], Iterable[float]]], title: str):
    """One panel per curve (``name -> (steps, values)``), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(curves), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.4), squeeze=False)
    for ax, (name, (steps, values)) in zip(axes[0], curves.items()):
        ax.plot(list(steps), list(values), lw=1.4)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: str | Path, data: Mapping) -> None:
    def default(v):
        if isinstance(v, np.generic | np.ndarray):
            return v.tolist()
        raise TypeError(f"not JSON serialisable: {type(v).__name__}")

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    Path(path).write_text(
        json.dumps({k: clean(v) for k, v in data.items()}, indent=2, default=default) + "\n"
    )
