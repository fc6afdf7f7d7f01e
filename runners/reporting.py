"""What a training run reports while and after it runs: progress lines, TensorBoard scalars, curve plots."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import tensorflow as tf

__all__ = ["Progress", "Summaries", "plot_curves"]

_log = logging.getLogger("headrace.train")


class Progress:
    """Logs ``NAME step N/total k=v ... steps/s ex/s eta`` at most every `every_seconds`."""

    def __init__(self, total_steps: int | None, every_seconds: float = 10.0, name: str = "train"):
        self.total, self.every, self.name = total_steps, every_seconds, name
        self.last = time.perf_counter()
        self.last_step, self.last_examples = None, 0

    def update(self, step: int, examples: int, scalars: Mapping[str, float], *, force: bool = False) -> None:
        now = time.perf_counter()
        if self.last_step is None:  # the first update starts the clock (after tracing)
            self.last_step, self.last_examples, self.last = step, examples, now
            if not force:
                return
        if not force and now - self.last < self.every:
            return
        seconds = max(now - self.last, 1e-9)
        rate = (step - self.last_step) / seconds
        parts = [f"{self.name} step {step}" + (f"/{self.total}" if self.total else "")]
        parts += [f"{k}={v:.4f}" for k, v in scalars.items()]
        parts.append(f"{rate:.1f} steps/s {(examples - self.last_examples) / seconds:.0f} ex/s")
        if self.total and rate > 0:
            parts.append(f"eta {_duration((self.total - step) / rate)}")
        _log.info(" ".join(parts))
        self.last, self.last_step, self.last_examples = now, step, examples


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
        steps, values = list(steps), list(values)
        ax.plot(steps, values, lw=1.4, marker="o" if len(steps) < 12 else None, ms=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
