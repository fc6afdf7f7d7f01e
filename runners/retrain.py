"""``headrace retrain ctr``: one day of a scheduled retraining, gated, resumable and safe to fire twice.

    headrace retrain ctr --logs ROOT --date YYYY-MM-DD --models MROOT [--golden FILE]
        [--max-auc-drop 0.002] [--runner R] [--set train.batch_size=...] [beam options]

One run takes the day through four stages, each of which leaves a result the next run can pick up:

    ingest    ROOT/dt=DATE/* -> ctr-ingest (any files it takes)          MROOT/.work/DATE/ingest/
    train     warm-started from the model MROOT/current names (weights, optimiser state, table rows,
              their counts and last-use clocks; a cold start when there is none)   .../model/
    evaluate  the candidate and the model in service, both through their SavedModels, on the day's
              held-out split and on the golden set                        .../evaluation.json
    promote   decision.json; the day's folder is renamed to MROOT/DATE (one rename), and MROOT/current,
              a symlink, is replaced by one to DATE (one rename) when the candidate is not worse

The gate (TFX's Evaluator blessing, without TFX): with ``--golden``, the candidate's golden AUC may be at
most ``--max-auc-drop`` below the model in service's; without it, the same test on the day's held-out
split. A cold start is promoted unless its AUC is not above 0.5. A refused model stays on disk in
MROOT/DATE with the reason in decision.json, and ``current`` keeps naming the model in service.

Safe to fire twice: a date whose decision is written and carried out does nothing (no byte under MROOT
changes); a run killed at any point leaves ``current`` untouched, and the next run for the date resumes
(a finished stage is not redone; training resumes from its last checkpoint); two runs for one date cannot
both work: MROOT/.DATE.lock is flock'ed by the run (the kernel releases it however the run ends) and
names it (id, pid, host); a run killed while holding it leaves the file, and the next one takes it over. ``HEADRACE_RETRAIN_KILL=STAGE`` makes the run SIGKILL itself inside that stage
(the tests' way of killing a run at a known point).

MROOT/DATE/: model/ (metrics.json, saved_model/, checkpoint/, tensorboard/, curves.png), report.json
(the ingest's), evaluation.json, decision.json, resolved_config.json.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError, HeadraceError, InputError
from headrace.pipelines.ctr import CtrIngestConfig
from headrace.runners.ctr_task import CTRTrainConfig

__all__ = ["CTRRetrainConfig", "Lock", "LockedError", "retrain_ctr", "serving_auc"]

_log = logging.getLogger("headrace.retrain")

STAGES = ("ingest", "train", "evaluate", "promote")
KILL_ENV = "HEADRACE_RETRAIN_KILL"


@dataclasses.dataclass(frozen=True)
class CTRRetrainConfig:
    logs: str = dataclasses.field(default="", metadata={"help": "ROOT holding dt=YYYY-MM-DD/ folders"})
    date: str = dataclasses.field(default="", metadata={"help": "the day to retrain on, YYYY-MM-DD"})
    models: str = dataclasses.field(default="", metadata={"help": "MROOT: one folder per date, current"})
    golden: str = dataclasses.field(
        default="", metadata={"help": "a fixed labelled Criteo TSV both models are scored on"}
    )
    max_auc_drop: float = dataclasses.field(
        default=0.002, metadata={"help": "largest AUC drop against the model in service that is promoted"}
    )
    ingest: CtrIngestConfig = dataclasses.field(default_factory=lambda: CtrIngestConfig(shards=4))
    train: CTRTrainConfig = dataclasses.field(default_factory=lambda: CTRTrainConfig(checkpoint_every=200))


@config_lib.register("retrain-ctr", command="retrain ctr")
def retrain_ctr_config() -> CTRRetrainConfig:
    """A day of Criteo logs: ctr-ingest, DeepFM warm-started from current, golden-gated promotion."""
    return CTRRetrainConfig()


# -------------------------------------------------------------------------------------------------
# The lock, the stages' fault points, small atomic writes
# -------------------------------------------------------------------------------------------------


class LockedError(HeadraceError):
    exit_code = 3


class Lock:
    """An exclusive lock on a file that names its run: ``{"run", "pid", "host"}``.

    The lock is the kernel's (``flock``), so it goes with its process however that ends: a SIGKILLed run
    leaves the file, with its name in it, but not the lock, and the next run takes it over. After taking
    the lock the file is checked to be still the one at `path` (a finishing run unlinks it; a run that
    opened the old file just before then retries on the new one)."""

    def __init__(self, path: Path):
        self.path = path
        self.run_id = uuid.uuid4().hex[:12]
        self._fd: int | None = None

    def __enter__(self) -> Lock:
        body = json.dumps({"run": self.run_id, "pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(10):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                os.close(fd)
                raise LockedError(
                    f"{self.path}: held by run {held or '(starting)'}; another retrain of this date is running"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # unlinked by the run that held it, between our open and our lock: again
                os.close(fd)
                continue
            left = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            if left:
                _log.warning("%s: taking over the lock of a run that is gone (%s)", self.path, left)
            os.ftruncate(fd, 0)
            os.pwrite(fd, body.encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return self
        raise LockedError(f"{self.path}: could not take the lock")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # while still held: a run waiting on this file retries
        os.close(self._fd)
        self._fd = None


class _Stage:
    """Logs a stage; with ``HEADRACE_RETRAIN_KILL=NAME`` SIGKILLs the process inside it (after
    ``HEADRACE_RETRAIN_KILL_AFTER`` seconds, default 1, or at its end if it is quicker)."""

    def __init__(self, date: str, name: str):
        self.date, self.name = date, name
        self.kill = os.environ.get(KILL_ENV) == name

    def __enter__(self):
        _log.info("retrain %s: %s", self.date, self.name)
        self.started = time.perf_counter()
        if self.kill:
            delay = float(os.environ.get(KILL_ENV + "_AFTER", "1"))
            self._timer = threading.Timer(delay, _kill_self)
            self._timer.daemon = True
            self._timer.start()
        return self

    def point(self) -> None:
        """A named point inside the stage where the fault, if it is this stage's, strikes at once."""
        if self.kill:
            _kill_self()

    def __exit__(self, exc_type, *exc) -> None:
        if self.kill and exc_type is None:
            _kill_self()
        self.seconds = time.perf_counter() - self.started


def _kill_self() -> None:
    _log.warning("%s: SIGKILL", KILL_ENV)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def _write_json(path: Path, data) -> None:
    """`data` as JSON, written to a temporary file and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_plain) + "\n")
    os.replace(tmp, path)


def _plain(v):
    return v.tolist() if hasattr(v, "tolist") else str(v)


def current_model(mroot: Path) -> Path | None:
    """The folder MROOT/current names (None before the first promotion)."""
    link = mroot / "current"
    return (mroot / os.readlink(link)) if link.is_symlink() else None


def _point_current(mroot: Path, date: str) -> None:
    """Replaces the symlink MROOT/current by one to `date` (a new link renamed over the old: atomic)."""
    tmp = mroot / f".current.{uuid.uuid4().hex[:8]}"
    os.symlink(date, tmp)
    os.replace(tmp, mroot / "current")


# -------------------------------------------------------------------------------------------------
# Scoring through the SavedModel
# -------------------------------------------------------------------------------------------------


def read_labelled_tsv(path: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A labelled Criteo TSV -> ({field: [N] strings}, labels [N]); a bad line is an error naming it."""
    from headrace.models.criteo import FIELDS

    columns = {f: [] for f in FIELDS}
    labels = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 40 or parts[0] not in ("0", "1"):
                raise InputError(
                    f"{path}:{n}: expected label (0/1) and 39 fields, got {len(parts)} fields"
                    + ("" if len(parts) != 40 else f" and label {parts[0][:10]!r}")
                )
            labels.append(int(parts[0]))
            for f_name, value in zip(FIELDS, parts[1:]):
                columns[f_name].append(value)
    if not labels:
        raise InputError(f"{path}: no lines")
    return {k: np.array(v, dtype=object) for k, v in columns.items()}, np.array(labels, np.int64)


def _split_columns(data: str, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The raw fields and labels of a ctr-ingest split (what a SavedModel is fed)."""
    from headrace.pipelines import ctr as ctr_data
    from headrace.pipelines.ctr_data import raw_columns

    parts, labels = [], []
    for batch in ctr_data.dataset(data, split, 8192):
        batch = {k: v.numpy() for k, v in batch.items()}
        parts.append(raw_columns(batch))
        labels.append(batch["label"])
    if not parts:
        raise InputError(f"{data}: the {split} split is empty")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, np.concatenate(labels)


def serving_probabilities(saved_model: Path, columns: dict[str, np.ndarray], batch: int = 8192) -> np.ndarray:
    import tensorflow as tf

    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    n = len(next(iter(columns.values())))
    out = []
    for i in range(0, n, batch):
        feed = {k: tf.constant(v[i : i + batch].astype(str)) for k, v in columns.items()}
        out.append(serve(**feed)["probability"].numpy())
    return np.concatenate(out)


def serving_auc(saved_model: Path, columns, labels) -> float:
    from headrace.models.metrics import auc

    return float(auc(labels, serving_probabilities(saved_model, columns)))


# -------------------------------------------------------------------------------------------------
# One day
# -------------------------------------------------------------------------------------------------


def _check(config: CTRRetrainConfig) -> str:
    for name in ("logs", "date", "models"):
        if not getattr(config, name):
            raise ConfigError(f"--{name} is required")
    try:
        date = datetime.date.fromisoformat(config.date).isoformat()
    except ValueError:
        raise ConfigError(f"--date {config.date!r}: expected YYYY-MM-DD") from None
    if date != config.date:
        raise ConfigError(f"--date {config.date!r}: expected YYYY-MM-DD")
    if config.golden and not Path(config.golden).is_file():
        raise InputError(f"--golden {config.golden}: no such file")
    return date


def _finished(mroot: Path, date: str) -> dict | None:
    """The date's decision when the date is done, promotion included; else None."""
    decision_file = mroot / date / "decision.json"
    if not decision_file.exists():
        return None
    decision = json.loads(decision_file.read_text())
    if decision["promoted"]:
        current = current_model(mroot)
        if current is None or current.name < date:
            return None  # renamed into place, killed before `current` moved: the promotion is still due
    return decision


def retrain_ctr(
    config: CTRRetrainConfig, runner: str | None = None, beam_args=(), *, dry_run: bool = False
) -> dict:
    """Retrains one date (see the module docstring); returns its decision. With `dry_run`, checks the
    flags and that the day has files, and returns the resolved config without writing anything."""
    date = _check(config)
    mroot = Path(config.models).absolute()
    if dry_run:
        day = Path(config.logs) / f"dt={date}"
        if not day.is_dir() or not any(p.is_file() for p in day.iterdir()):
            raise InputError(f"--logs {config.logs}: no files in {day}")
        return {"dry_run": True, "date": date, "config": dataclasses.asdict(config)}
    done = _finished(mroot, date)  # read-only: a finished date writes nothing, not even a lock
    if done is not None:
        _log.info("retrain %s: already finished (%s)", date, "promoted" if done["promoted"] else "refused")
        return {**done, "already_finished": True}
    day = Path(config.logs) / f"dt={date}"
    if not day.is_dir() or not any(p.is_file() for p in day.iterdir()):
        raise InputError(f"--logs {config.logs}: no files in {day}")
    mroot.mkdir(parents=True, exist_ok=True)
    with Lock(mroot / f".{date}.lock"):
        done = _finished(mroot, date)
        if done is not None:
            return {**done, "already_finished": True}
        if (mroot / date / "decision.json").exists():  # killed between the rename and `current`
            with _Stage(date, "promote"):
                _point_current(mroot, date)
            _tidy(mroot)
            return json.loads((mroot / date / "decision.json").read_text())
        return _run_day(config, date, mroot, day, runner, beam_args)


def _run_day(config: CTRRetrainConfig, date: str, mroot: Path, day: Path, runner, beam_args) -> dict:
    from headrace.runners.beam_runner import run_pipeline
    from headrace.runners.train_ctr import train_and_evaluate

    work = mroot / ".work" / date
    work.mkdir(parents=True, exist_ok=True)
    base_file = work / "base.json"
    if not base_file.exists():  # the model this date starts from, fixed at its first attempt
        current = current_model(mroot)
        _write_json(base_file, {"base": current.name if current else None})
    base_name = json.loads(base_file.read_text())["base"]
    base = mroot / base_name if base_name else None
    seconds = {}

    ingest = work / "ingest"
    with _Stage(date, "ingest") as stage:
        if not (ingest / "report.json").exists():
            for stale in work.glob(".ingest.staging-*"):
                shutil.rmtree(stale, ignore_errors=True)
            from headrace.pipelines.ctr import build_ctr_ingest

            ingest_config = dataclasses.replace(config.ingest, input=str(day / "*"), output=str(ingest))
            run_pipeline(
                build_ctr_ingest,
                ingest_config,
                runner=runner,
                beam_args=beam_args,
                job_name="headrace-retrain",
            )
    seconds["ingest"] = stage.seconds

    model = work / "model"
    with _Stage(date, "train") as stage:
        if not (model / "metrics.json").exists():
            train_config = dataclasses.replace(
                config.train,
                data=str(ingest),
                output=str(model),
                resume=True,
                export=True,
                warm_start=str(base / "model") if base else "",
            )
            train_and_evaluate(train_config)
    seconds["train"] = stage.seconds

    evaluation_file = work / "evaluation.json"
    with _Stage(date, "evaluate") as stage:
        if not evaluation_file.exists():
            _write_json(evaluation_file, _evaluate(config, ingest, model, base))
    seconds["evaluate"] = stage.seconds
    evaluation = json.loads(evaluation_file.read_text())

    with _Stage(date, "promote") as stage:
        decision = _decide(config, date, base_name, evaluation)
        decision["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        shutil.copyfile(ingest / "report.json", work / "report.json")
        config_lib.dump(config, work / "resolved_config.json", extra={"runner": runner or "FnApiRunner"})
        _write_json(work / "decision.json", decision)
        shutil.rmtree(ingest)  # the day's shards are not kept: the logs are the source of truth
        for name in ("base.json", ".model.partial"):
            path = work / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        os.rename(work, mroot / date)
        stage.point()  # a run killed here has its folder in place and `current` not yet moved
        if decision["promoted"]:
            _point_current(mroot, date)
    _tidy(mroot)
    _log.info(
        "retrain %s: %s (%s)", date, "promoted" if decision["promoted"] else "refused", decision["reason"]
    )
    return decision


def _tidy(mroot: Path) -> None:
    work = mroot / ".work"
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()


def _evaluate(config: CTRRetrainConfig, ingest: Path, model: Path, base: Path | None) -> dict:
    """AUC of the candidate and of the model in service on the day's held-out split and the golden set."""
    out = {"examples": {}}
    sets = {"day": _split_columns(str(ingest), "eval")}
    if config.golden:
        sets["golden"] = read_labelled_tsv(config.golden)
    for name, (columns, labels) in sets.items():
        out["examples"][name] = len(labels)
        out[f"candidate_{name}_auc"] = serving_auc(model / "saved_model", columns, labels)
        if base is not None:
            out[f"base_{name}_auc"] = serving_auc(base / "model" / "saved_model", columns, labels)
    return out


def _decide(config: CTRRetrainConfig, date: str, base: str | None, evaluation: dict) -> dict:
    gate = "golden" if config.golden else "day"
    candidate = evaluation[f"candidate_{gate}_auc"]
    decision = {
        "date": date,
        "base": base,
        "gate": gate,
        "candidate_auc": candidate,
        "max_auc_drop": config.max_auc_drop,
        "evaluation": evaluation,
    }
    if base is None:
        promoted = candidate > 0.5
        reason = (
            f"cold start: {gate} AUC {candidate:.4f}"
            if promoted
            else f"cold start: {gate} AUC {candidate:.4f} is not above 0.5"
        )
    else:
        serving = evaluation[f"base_{gate}_auc"]
        decision["base_auc"] = serving
        drop = serving - candidate
        promoted = drop <= config.max_auc_drop
        reason = (
            f"{gate} AUC {candidate:.4f} vs {serving:.4f} in service (drop {drop:+.4f}, "
            f"{'within' if promoted else 'beyond'} the {config.max_auc_drop} allowed)"
        )
    decision.update(promoted=bool(promoted), reason=reason)
    return decision
