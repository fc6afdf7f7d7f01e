"""One training loop for every trainer: a `Task` says what to train, `fit` does everything else.

A task builds its model on a mesh, yields host batches, places a batch on the mesh and defines one
training step, a TensorFlow function of the placed inputs that `fit` traces once. `fit` owns the rest,
the same for every model:

* the output directory, staged: written as ``.NAME.partial`` beside it and renamed into place when the run
  succeeds, so a failed run leaves the previous output untouched (and its checkpoints, for ``--resume``);
* ``resolved_config.json``, the mesh, the compiled step, the loop over the batches;
* progress lines (step, the step's scalars, steps/s, examples/s, ETA) and TensorBoard scalars;
* checkpoints every ``checkpoint_every`` steps or ``checkpoint_every_seconds``, after every epoch and at
  the end; ``--resume`` continues from the newest one;
* evaluation after every epoch (`Task.eval_every_epoch`) and at the end, with batches padded to a
  multiple of the mesh's batch dimension and the padding cut off again (`Fit.predict`);
* ``metrics.json``, ``curves.png``, the task's SavedModel export and its own files.

A trainer module is then its config (extending `TrainConfig`), its task, and an entry point that calls
``loop.fit(MyTask(config))``; docs/architecture.md has a complete twenty-line task, which
tests/runners/test_loop.py runs.

Trainers with several phases (CTR's feature selection, then retraining) run them in one `Run`; a trainer
that never stops (the online CTR trainer) is a task whose batches never end, with ``staged = False``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from headrace.core import cluster
from headrace.core import config as config_lib
from headrace.core import mesh as mesh_lib
from headrace.core.errors import ConfigError, HeadraceError, InputError
from headrace.core.outputs import commit_directory, write_json
from headrace.runners.checkpoints import HOST_GROUP, Checkpoints, pad_batch
from headrace.runners.reporting import Progress, Summaries, plot_curves

__all__ = [
    "HOST_GROUP",
    "Checkpoints",
    "Fit",
    "FitResult",
    "Run",
    "Task",
    "TrainConfig",
    "fit",
    "pad_batch",
]

_log = logging.getLogger("headrace.train")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The fields the loop reads; every trainer's config extends it (and may change the defaults)."""

    data: str = dataclasses.field(default="", metadata={"help": "the pipeline output to train on"})
    output: str = ""
    mesh: str = dataclasses.field(
        default="auto",
        metadata={"help": "NAME=SIZE,... or auto (batch=4,model=2 on CPUs, a mesh of the GPUs present)"},
    )
    seed: int = 0
    log_every_seconds: float = 10.0
    checkpoint_every: int = dataclasses.field(
        default=0, metadata={"help": "steps between checkpoints (0: after every epoch and at the end)"}
    )
    checkpoint_every_seconds: float = dataclasses.field(
        default=0.0, metadata={"help": "seconds between checkpoints (0: by steps only)"}
    )
    resume: bool = dataclasses.field(
        default=False, metadata={"help": "continue from the newest checkpoint of --output"}
    )
    warm_start: str = dataclasses.field(
        default="",
        metadata={
            "help": "start from the final checkpoint of this earlier output (weights, optimiser, host state)"
        },
    )
    num_clients: int = dataclasses.field(
        default=1,
        metadata={"help": "DTensor clients holding the mesh between them (headrace launch starts them)"},
    )
    client_id: int = dataclasses.field(default=0, metadata={"help": "this client's index, 0..num_clients-1"})
    jobs: str = dataclasses.field(
        default="", metadata={"help": "host:port of every client, in client order (DTENSOR_JOBS)"}
    )
    input_shards: int = dataclasses.field(
        default=0,
        metadata={
            "help": "streams the training input is read in, each over its own files (0: one per client); "
            "runs with the same value train on the same batches whatever the number of clients"
        },
    )


# -------------------------------------------------------------------------------------------------
# The task protocol
# -------------------------------------------------------------------------------------------------


class Task:
    """What a trainer supplies to `fit` (see the module docstring); every hook but `build`, `place` and
    `train_step` has a default."""

    #: names progress lines, TensorBoard runs and plots
    name = "train"
    #: False: the task trains in place in its output directory (a live state directory, always resumed)
    staged = True
    #: evaluate after every epoch (needs `steps_per_epoch`), not only at the end
    eval_every_epoch = False
    #: loss_last in metrics.json is the mean of this many last steps
    loss_window = 20

    def __init__(self, config):
        self.config = config
        self.mesh = None

    # -- set-up -----------------------------------------------------------------------------------

    def create_mesh(self):
        """The DTensor mesh of ``config.mesh`` (None for an empty spec: plain TensorFlow)."""
        spec = getattr(self.config, "mesh", "")
        return mesh_lib.create_mesh(spec) if spec else None

    def build(self, mesh) -> None:
        """Creates the model, its optimiser and whatever the step needs, on `mesh`."""
        raise NotImplementedError

    def checkpoint_groups(self) -> Mapping[str, Mapping[str, Any]]:
        """``{group: {name: trackable}}``; each group is its own checkpoint (DTensor cannot save
        DVariables and host variables in one), written in order under one step number. Group "" is
        written at the top of the checkpoint directory."""
        return {}

    def restored(self, fit: Fit) -> None:
        """Called after a checkpoint was restored: ``fit.step`` is its step when resumed, 0 when warm
        started from another output's checkpoint (``fit.warm_started`` is that checkpoint's step)."""

    # -- the schedule -----------------------------------------------------------------------------

    def total_steps(self) -> int | None:
        """Steps to train to (None: until `batches` ends)."""
        steps = getattr(self.config, "steps", 0)
        return steps or None

    def steps_per_epoch(self) -> int | None:
        return None

    # -- training ---------------------------------------------------------------------------------

    def dataset(self, epoch: int) -> Iterable:
        """The host batches of one epoch (or, without `steps_per_epoch`, of the whole run)."""
        raise NotImplementedError

    def batches(self, step: int) -> Iterator:
        """Host batches from global step `step` on. A task may yield None: a tick with nothing to train,
        which lets periodic work run while a stream is idle."""
        per_epoch = self.steps_per_epoch()
        if per_epoch is None:
            yield from _skip(self.dataset(0), step)
            return
        epoch = step // per_epoch
        while True:
            yield from _skip(self.dataset(epoch), step - epoch * per_epoch)
            step = (epoch + 1) * per_epoch
            epoch += 1

    def place(self, batch, step: int) -> Sequence:
        """A host batch -> the inputs of `train_step` (on the mesh)."""
        raise NotImplementedError

    def train_step(self, *inputs) -> Mapping[str, Any]:
        """One step; traced once by `fit`. Returns named scalars, ``loss`` first."""
        raise NotImplementedError

    def examples(self, batch) -> int:
        """Examples in a host batch (for examples/s)."""
        return int(getattr(self.config, "batch_size", 1))

    def after_step(self, fit: Fit, batch, scalars: dict[str, float]) -> None:
        """Host work after a step (`fit.step` already counts it); may add scalars to log."""

    def periodic(self) -> Sequence[tuple[float, Callable[[Fit], None]]]:
        """``(every seconds, fn(fit))``: work run between steps (and on idle ticks) at most that often."""
        return ()

    def checkpoint_seconds(self) -> float:
        """Seconds between checkpoints (0: by steps and epochs only)."""
        return float(getattr(self.config, "checkpoint_every_seconds", 0.0))

    def before_checkpoint(self, fit: Fit) -> None:
        """Copies host state into checkpointed variables just before a save."""

    def finish(self, fit: Fit) -> None:
        """Runs once after the last step, before the final checkpoint."""

    # -- evaluation and outputs -------------------------------------------------------------------

    def evaluate(self, fit: Fit) -> dict[str, float]:
        """Held-out metrics of the current weights ({} when the task has none)."""
        return {}

    def predict_step(self, *inputs):
        """The forward pass `Fit.predict` runs on placed eval inputs; traced once by `fit`."""
        raise NotImplementedError

    def metrics(self, result: FitResult) -> dict[str, Any]:
        """What goes into metrics.json beside the loop's own figures."""
        return {}

    def curves(self, result: FitResult) -> dict[str, tuple[Sequence[float], Sequence[float]]]:
        """Panels of curves.png (default: every scalar the step returns, and every eval metric)."""
        return result.curves()

    def title(self, metrics: Mapping[str, Any]) -> str:
        return self.name

    def export(self, directory: Path) -> None:
        """Writes the SavedModel (called with ``OUT/saved_model`` when ``config.export`` is set)."""

    def write_outputs(self, directory: Path, result: FitResult, metrics: dict) -> None:
        """Writes the task's own files into the (staged) output directory."""


def _skip(dataset, n: int) -> Iterator:
    if n <= 0:
        yield from dataset
        return
    if isinstance(dataset, tf.data.Dataset):
        yield from dataset.skip(n)
        return
    for i, item in enumerate(dataset):
        if i >= n:
            yield item


# -------------------------------------------------------------------------------------------------
# One phase of training
# -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
    """What one training phase did."""

    phase: str
    start_step: int
    steps: int  # the global step at the end
    history: dict[str, list[float]]  # per step of this run: every scalar the step returned
    eval_history: list[tuple[int, dict[str, float]]]  # (step, metrics) of every evaluation
    train_seconds: float  # the loop's wall time, evaluations excluded
    step_seconds: list[float]  # each step's own time (placement and step), tracing in the first
    examples: int
    final: dict[str, float]  # the last evaluation (of the final weights)
    mesh: Any = None

    @property
    def examples_per_sec(self) -> float:
        return self.examples / self.train_seconds if self.train_seconds > 0 else 0.0

    def curves(self) -> dict[str, tuple[Sequence[float], Sequence[float]]]:
        first = self.start_step + 1
        out = {}
        for name, values in self.history.items():
            out[f"train {name}"] = (range(first, first + len(values)), values)
        if self.eval_history:
            for name in self.eval_history[-1][1]:
                points = [(s, m[name]) for s, m in self.eval_history if _plottable(m.get(name))]
                if len(points) > 1:
                    out[f"eval {name}"] = tuple(zip(*points))
        return out


def _plottable(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Fit:
    """The state of one training phase, handed to a task's hooks: ``step``, ``mesh``, ``directory``,
    ``summaries``; `predict` runs the task's forward pass over host batches."""

    def __init__(
        self, task: Task, directory: Path, phase: str, *, resume: bool, checkpoint_root: Path | None = None
    ):
        self.task, self.directory, self.phase, self.resume = task, directory, phase, resume
        # Under several clients every one saves its shards into client 0's directory (see Checkpoints).
        self.checkpoint_root = checkpoint_root or directory
        self.clients = cluster.Clients.current()
        self.step = 0
        self.mesh = None
        self.summaries: Summaries | None = None
        self.history: dict[str, list[float]] = defaultdict(list)  # every scalar of every step of this run
        self.warm_started: int | None = None
        self._predict = None

    @property
    def batch_multiple(self) -> int:
        """Batch sizes must be multiples of this: the mesh's ``batch`` dimension."""
        mesh = self.mesh
        return mesh.dim_size("batch") if mesh is not None and "batch" in mesh.dim_names else 1

    def predict(self, batches: Iterable[Mapping[str, Any]], place: Callable[[dict], Sequence]):
        """``(batch, outputs)`` for every host batch: padded to `batch_multiple`, placed by `place`, run
        through the task's compiled `predict_step`, and cut back to the batch's true size (numpy)."""
        if self._predict is None:
            self._predict = tf.function(self.task.predict_step, reduce_retracing=True)
        for batch in batches:
            padded, n = pad_batch(batch, self.batch_multiple)
            out = self._predict(*place(padded))
            yield batch, tf.nest.map_structure(lambda t, n=n: mesh_lib.to_numpy(t)[:n], out)

    def _warm_start(self, source: Path, groups) -> None:
        """Restores another output's newest checkpoint of this phase; training then counts steps from 0
        on the new data (a task that keeps a clock of its own reads it in `Task.restored`)."""
        directory = source / "checkpoint" / self.phase
        if not directory.is_dir():
            raise InputError(f"--warm-start {source}: no checkpoint directory {directory}")
        try:
            step = Checkpoints(directory, groups).restore_latest()
        except (ValueError, AssertionError, tf.errors.OpError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(
                f"--warm-start {source}: its checkpoint does not fit this model (same model, capacity and "
                f"embedding dim?): {first}"
            ) from e
        if step is None:
            raise InputError(f"--warm-start {source}: no complete checkpoint in {directory}")
        self.warm_started = step
        _log.info("%s: warm-started from %s (its step %d)", self.task.name, source, step)
        self.task.restored(self)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> FitResult:
        task, c = self.task, self.task.config
        self.mesh = task.create_mesh()
        task.mesh = self.mesh
        clients = self.clients
        if clients.multi and (self.mesh is None or self.mesh.num_local_devices() == self.mesh.size):
            raise ConfigError(f"{task.name}: --num-clients {clients.count} needs a mesh (--mesh) to share")
        task.build(self.mesh)
        checkpoints = Checkpoints(
            self.checkpoint_root / "checkpoint" / self.phase, task.checkpoint_groups(), chief=clients.chief
        )
        start = 0
        if self.resume and checkpoints:
            restored = checkpoints.restore_latest()
            if restored is not None:
                start = restored
                self.step = start
                _log.info("%s: resumed at step %d", task.name, start)
                task.restored(self)
        if start == 0 and getattr(c, "warm_start", ""):
            self._warm_start(Path(c.warm_start), task.checkpoint_groups())
        self.step = start
        total, per_epoch = task.total_steps(), task.steps_per_epoch()
        if total is not None and start >= total:
            _log.info("%s: already at step %d of %d", task.name, start, total)
        self.summaries = Summaries(self.directory / "tensorboard" / self.phase)
        progress = Progress(total, getattr(c, "log_every_seconds", 10.0), name=task.name)
        step_fn = tf.function(task.train_step, reduce_retracing=True)
        timers = [[every, fn, time.monotonic()] for every, fn in task.periodic()]
        every_steps = getattr(c, "checkpoint_every", 0)
        every_seconds = task.checkpoint_seconds()
        history = self.history
        evals: list[tuple[int, dict]] = []
        step_seconds: list[float] = []
        examples, eval_seconds = 0, 0.0

        def evaluate() -> None:
            nonlocal eval_seconds
            t = time.perf_counter()
            metrics = task.evaluate(self)
            eval_seconds += time.perf_counter() - t
            if metrics:
                evals.append((self.step, metrics))
                self.summaries.scalars(
                    self.step, {f"eval/{k}": v for k, v in metrics.items() if _plottable(v)}
                )
                shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if _plottable(v))
                _log.info("%s: step %d eval %s", task.name, self.step, shown)

        def save(*, unless_saved: bool = False) -> None:
            nonlocal last_save, saved_step
            # A staged task's state changes only with its steps: a step already saved is not saved again.
            # A live one's (read positions, buffered examples) moves between steps too.
            if checkpoints and not (unless_saved and task.staged and saved_step == self.step):
                task.before_checkpoint(self)
                checkpoints.save(self.step)
                saved_step = self.step
            last_save = time.monotonic()

        last_save, saved_step = time.monotonic(), None
        started = time.perf_counter()
        for batch in task.batches(start) if total is None or start < total else ():
            if batch is not None:
                t = time.perf_counter()
                if clients.multi:  # this client's rows -> the global batch every client places from
                    batch = cluster.gather(self.mesh, batch)
                out = step_fn(*task.place(batch, self.step))
                scalars = {k: float(mesh_lib.to_numpy(v)) for k, v in out.items()}
                step_seconds.append(time.perf_counter() - t)
                self.step += 1
                examples += task.examples(batch)
                for k, v in scalars.items():
                    history[k].append(v)
                task.after_step(self, batch, scalars)
                self.summaries.scalars(self.step, scalars)
                progress.update(self.step, examples, scalars, force=self.step == total)
                epoch_end = per_epoch is not None and self.step % per_epoch == 0
                if epoch_end and task.eval_every_epoch:
                    evaluate()
                if epoch_end or (every_steps and self.step % every_steps == 0):
                    save()
            now = time.monotonic()
            for timer in timers:
                if now - timer[2] >= timer[0]:
                    timer[1](self)
                    timer[2] = time.monotonic()
            if every_seconds and now - last_save >= every_seconds:
                save()
            if total is not None and self.step >= total:
                break
        train_seconds = time.perf_counter() - started - eval_seconds
        if total is not None and self.step < total:
            raise InputError(
                f"--data {getattr(c, 'data', '')}: the training input ended after {self.step} of "
                f"{total} steps"
            )
        task.finish(self)
        loss = history.get("loss")
        if loss and not math.isfinite(loss[-1]):
            raise HeadraceError(
                f"{task.name}: training diverged (loss {loss[-1]} at step {self.step}); lower the "
                "learning rate"
            )
        if not evals or evals[-1][0] != self.step:
            evaluate()
        save(unless_saved=True)
        self.summaries.close()
        return FitResult(
            phase=self.phase,
            start_step=start,
            steps=self.step,
            history=dict(history),
            eval_history=evals,
            train_seconds=train_seconds,
            step_seconds=step_seconds,
            examples=examples,
            final=evals[-1][1] if evals else {},
            mesh=self.mesh,
        )


# -------------------------------------------------------------------------------------------------
# A run: the output directory
# -------------------------------------------------------------------------------------------------


class Run:
    """One trainer invocation's output directory, and the phases trained into it.

    Staged (the default): everything is written to ``.NAME.partial`` beside ``config.output`` and renamed
    into place when the run succeeds, replacing an older output only then. A run that fails keeps the
    partial directory when it holds checkpoints (``--resume`` continues from them) and removes it
    otherwise. With ``--resume`` and no partial directory, the checkpoints of the existing output are
    copied in first. Not staged (``staged=False``): the output directory itself is the working
    directory, as for a trainer that runs forever and always resumes.
    """

    def __init__(self, config, *, staged: bool = True, resume: bool | None = None):
        output = getattr(config, "output", "")
        if not output:
            raise HeadraceError("--output is required")
        self.config = config
        self.output = Path(output).absolute()
        self.staged = staged
        self.resume = bool(getattr(config, "resume", False)) if resume is None else resume
        self.dir = self.output.parent / f".{self.output.name}.partial" if staged else self.output
        self.clients = cluster.Clients.current()
        self.shared = self.dir  # where checkpoints go (client 0's directory)
        if self.clients.multi:
            if not staged:
                raise ConfigError("a trainer that runs forever (the online trainer) runs on one client")
            if not self.clients.chief:
                # Clients other than 0 run the same code (everything on the mesh is collective) but write
                # their summaries, metrics and exports into a scratch directory removed at the end.
                self.dir = self.output.parent / f".{self.output.name}.client-{self.clients.index}.partial"
        data = getattr(config, "data", None)
        if staged and isinstance(data, str) and data and "://" not in data and not Path(data).is_dir():
            # Checked before anything is written: a typo in --data leaves no output behind.
            raise InputError(f"--data {data}: no such directory (the output folder of a headrace pipeline)")

    def __enter__(self) -> Run:
        # TensorFlow's global seed enters every seeded op (a dataset's shuffle(seed=...) included): set from
        # the config here, a run gives the same model in a fresh process as after other work in this one.
        tf.random.set_seed(getattr(self.config, "seed", 0))
        if not self.clients.chief:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.staged:
            if not self.resume:
                shutil.rmtree(self.dir, ignore_errors=True)
            elif not self.dir.exists() and (self.output / "checkpoint").is_dir():
                shutil.copytree(self.output / "checkpoint", self.dir / "checkpoint")
        self.dir.mkdir(parents=True, exist_ok=True)
        config_lib.dump(self.config, self.dir / "resolved_config.json")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.clients.chief:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        if not self.staged:
            return
        if exc_type is None:
            if self.output.exists():
                _log.info("replacing %s", self.output)
            commit_directory(self.dir, self.output)
        elif (self.dir / "checkpoint").is_dir() and any((self.dir / "checkpoint").rglob("*.index")):
            _log.warning("run failed; its checkpoints are kept in %s (--resume continues)", self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def train(self, task: Task, phase: str = "", *, resume: bool | None = None) -> FitResult:
        """Trains one phase of `task` into this run's directory."""
        resume = self.resume or not task.staged if resume is None else resume
        return Fit(task, self.dir, phase, resume=resume, checkpoint_root=self.shared).run()

    def finish(
        self,
        task: Task,
        result: FitResult,
        *,
        extra: Mapping[str, Any] | None = None,
        curves: Mapping[str, tuple] | None = None,
    ) -> dict[str, Any]:
        """Writes metrics.json, curves.png, the SavedModel and the task's files; returns the metrics."""
        loss = result.history.get("loss", [])
        mesh = result.mesh
        metrics: dict[str, Any] = {
            "steps": result.steps,
            **(
                {"loss_first": loss[0], "loss_last": float(np.mean(loss[-task.loss_window :]))}
                if loss
                else {}
            ),
            **result.final,
            "examples_per_sec": result.examples_per_sec,
            "train_seconds": result.train_seconds,
        }
        metrics["mesh"] = getattr(self.config, "mesh", "")
        if mesh is not None:
            metrics.update(devices=mesh.size, device_type=mesh.device_type())
            if self.clients.multi:
                metrics.update(clients=self.clients.count, local_devices=mesh.num_local_devices())
        metrics.update(task.metrics(result))
        metrics.update(extra or {})
        if getattr(self.config, "export", True):
            task.export(self.dir / "saved_model")
        task.write_outputs(self.dir, result, metrics)
        write_json(self.dir / "metrics.json", metrics)
        panels = {**(curves or {}), **task.curves(result)}
        if panels:
            plot_curves(self.dir / "curves.png", panels, title=task.title(metrics))
        return metrics


def fit(task: Task) -> dict[str, Any]:
    """Trains `task` into ``task.config.output`` and writes its outputs; returns the metrics."""
    with Run(task.config, staged=task.staged) as run:
        return run.finish(task, run.train(task))
