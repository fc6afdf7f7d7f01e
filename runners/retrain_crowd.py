"""``headrace retrain crowd``: one scheduled day of crowd labels, merged with every earlier day.

    headrace retrain crowd --annotations-root ROOT --date YYYY-MM-DD --models MROOT
        [--set crowd.method=groupanno --set crowd.annotators=W.csv ...] [--runner R]

ROOT holds one folder per day, ``dt=YYYY-MM-DD/``, of ``task,worker,label`` CSVs (the annotations that
arrived that day: new tasks, and more labels for old ones). One run:

    merge      every file of every day up to DATE (later days are not seen)     MROOT/.work/DATE/inputs.json
    aggregate  ``run crowd-labels`` (the EM of --set crowd.method) over them    .../labels/
    compare    against the labels in service (MROOT/current): which labels changed, by how much each
               task's posterior moved, the new tasks                            .../changes.csv, decision.json
    promote    the day's folder renamed to MROOT/DATE, MROOT/current moved to it (one rename each)

The aggregation is re-run over the whole history rather than started from the earlier parameters: the
result of a day is exactly ``run crowd-labels`` on all annotations up to it (the tests compare them), and
a label changes only where the posterior moved (each change is listed with the move). The cost grows
with the history: at some point the earlier days' sufficient statistics should be carried instead.

Idempotence, resumption after a kill and the per-date lock are those of ``retrain ctr``
(`headrace.runners.retrain`): a finished date writes nothing; a killed run leaves ``current`` as it
was and the next run resumes at the first stage not done.

MROOT/DATE/: labels/ (the crowd-labels output: labels.csv, posteriors.csv, annotators.csv, report.json,
...), inputs.json, changes.csv (task, old label, new label, posterior move), decision.json.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import logging
import os
import shutil
from pathlib import Path

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError, InputError
from headrace.pipelines.crowd import CrowdConfig
from headrace.runners import retrain as ctr_retrain

__all__ = ["CrowdRetrainConfig", "read_posteriors", "retrain_crowd"]

_log = logging.getLogger("headrace.retrain")

STAGES = ("merge", "aggregate", "compare", "promote")


@dataclasses.dataclass(frozen=True)
class CrowdRetrainConfig:
    annotations_root: str = dataclasses.field(
        default="",
        metadata={"help": "ROOT with dt=YYYY-MM-DD/ folders of task,worker,label CSVs", "required": True},
    )
    date: str = dataclasses.field(
        default="", metadata={"help": "the day to add (YYYY-MM-DD)", "required": True}
    )
    models: str = dataclasses.field(
        default="", metadata={"help": "MROOT: dated labels and `current`", "required": True}
    )
    crowd: CrowdConfig = dataclasses.field(default_factory=lambda: CrowdConfig(partitions=4))


@config_lib.register("retrain-crowd", command="retrain crowd")
def retrain_crowd_config() -> CrowdRetrainConfig:
    """One day of crowd labels: all annotations up to the date, aggregated, compared, promoted."""
    return CrowdRetrainConfig()


def read_posteriors(path: Path) -> dict[str, tuple[float, ...]]:
    """posteriors.csv -> {task: posterior per class, in the header's order}."""
    with open(path, newline="") as f:
        rows = csv.reader(f)
        next(rows)
        return {r[0]: tuple(float(x) for x in r[1:]) for r in rows}


def _labels(path: Path) -> dict[str, str]:
    with open(path, newline="") as f:
        return {r["task"]: r["label"] for r in csv.DictReader(f)}


def _check(config: CrowdRetrainConfig) -> str:
    for name in ("annotations_root", "date", "models"):
        if not getattr(config, name):
            raise ConfigError(f"--{name.replace('_', '-')} is required")
    try:
        date = datetime.date.fromisoformat(config.date).isoformat()
    except ValueError:
        date = ""
    if date != config.date:
        raise ConfigError(f"--date {config.date!r}: expected YYYY-MM-DD")
    day = Path(config.annotations_root) / f"dt={date}"
    if not day.is_dir() or not any(p.is_file() for p in day.iterdir()):
        raise InputError(f"--annotations-root {config.annotations_root}: no files in {day}")
    return date


def retrain_crowd(
    config: CrowdRetrainConfig, runner: str | None = None, beam_args=(), *, dry_run: bool = False
) -> dict:
    """Adds one date (see the module docstring); returns its decision."""
    date = _check(config)
    mroot = Path(config.models).absolute()
    if dry_run:
        return {"dry_run": True, "date": date, "config": dataclasses.asdict(config)}
    done = ctr_retrain._finished(mroot, date)
    if done is not None:
        _log.info("retrain crowd %s: already finished", date)
        return {**done, "already_finished": True}
    mroot.mkdir(parents=True, exist_ok=True)
    with ctr_retrain.Lock(mroot / f".{date}.lock"):
        done = ctr_retrain._finished(mroot, date)
        if done is not None:
            return {**done, "already_finished": True}
        if (mroot / date / "decision.json").exists():  # killed between the rename and `current`
            with ctr_retrain._Stage(date, "promote"):
                ctr_retrain._point_current(mroot, date)
            ctr_retrain._tidy(mroot)
            return json.loads((mroot / date / "decision.json").read_text())
        return _run_day(config, date, mroot, runner, beam_args)


def _merge(config: CrowdRetrainConfig, date: str, work: Path) -> dict:
    """Links every annotation file of the days up to `date` into work/annotations/ (the glob the
    aggregation reads); returns what was taken."""
    root = Path(config.annotations_root).absolute()
    days = sorted(p for p in root.glob("dt=*") if p.is_dir() and p.name[3:] <= date)
    links = work / "annotations"
    shutil.rmtree(links, ignore_errors=True)
    links.mkdir(parents=True)
    taken = {}
    for day in days:
        files = sorted(p for p in day.iterdir() if p.is_file())
        for f in files:
            os.symlink(f, links / f"{day.name}_{f.name}")
        taken[day.name[3:]] = [f.name for f in files]
    return {"days": taken, "files": sum(len(v) for v in taken.values())}


def _compare(work: Path, base: Path | None) -> dict:
    new_post = read_posteriors(work / "labels" / "posteriors.csv")
    new_labels = _labels(work / "labels" / "labels.csv")
    if base is None:
        (work / "changes.csv").write_text("task,old_label,new_label,posterior_move\n")
        return {"tasks": len(new_labels), "new_tasks": len(new_labels), "changed_labels": 0, "base": None}
    old_post = read_posteriors(base / "labels" / "posteriors.csv")
    old_labels = _labels(base / "labels" / "labels.csv")
    rows, moves = [], []
    for task, label in sorted(new_labels.items()):
        if task not in old_labels:
            continue
        move = max(abs(a - b) for a, b in zip(new_post[task], old_post[task]))
        moves.append(move)
        if label != old_labels[task]:
            rows.append((task, old_labels[task], label, f"{move:.6g}"))
    with open(work / "changes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "old_label", "new_label", "posterior_move"])
        writer.writerows(rows)
    lost = sorted(set(old_labels) - set(new_labels))
    if lost:  # a day's files are never removed: a task that disappears is a broken history
        raise InputError(f"{len(lost)} tasks labelled before have no label now (first: {lost[0]})")
    return {
        "tasks": len(new_labels),
        "new_tasks": len(new_labels) - len(old_labels),
        "changed_labels": len(rows),
        "smallest_move_of_a_change": min((float(r[3]) for r in rows), default=None),
        "largest_move": max(moves, default=0.0),
        "base": base.name,
    }


def _run_day(config: CrowdRetrainConfig, date: str, mroot: Path, runner, beam_args) -> dict:
    from headrace.pipelines.crowd import build_crowd_labels
    from headrace.runners.beam_runner import run_pipeline

    work = mroot / ".work" / date
    work.mkdir(parents=True, exist_ok=True)
    base_file = work / "base.json"
    if not base_file.exists():
        current = ctr_retrain.current_model(mroot)
        ctr_retrain._write_json(base_file, {"base": current.name if current else None})
    base_name = json.loads(base_file.read_text())["base"]
    seconds = {}
    with ctr_retrain._Stage(date, "merge") as stage:
        if not (work / "inputs.json").exists():
            ctr_retrain._write_json(work / "inputs.json", _merge(config, date, work))
    seconds["merge"] = stage.seconds
    with ctr_retrain._Stage(date, "aggregate") as stage:
        if not (work / "labels" / "report.json").exists():
            crowd = dataclasses.replace(
                config.crowd, annotations=str(work / "annotations" / "*"), output=str(work / "labels")
            )
            run_pipeline(build_crowd_labels, crowd, runner=runner, beam_args=beam_args, overwrite=True)
    seconds["aggregate"] = stage.seconds
    with ctr_retrain._Stage(date, "compare") as stage:
        if not (work / "changes.json").exists():
            ctr_retrain._write_json(
                work / "changes.json", _compare(work, mroot / base_name if base_name else None)
            )
    seconds["compare"] = stage.seconds
    changes = json.loads((work / "changes.json").read_text())
    with ctr_retrain._Stage(date, "promote") as stage:
        report = json.loads((work / "labels" / "report.json").read_text())
        decision = {
            "date": date,
            "base": base_name,
            "promoted": True,
            "reason": f"{changes['tasks']} tasks ({changes['new_tasks']} new), {changes['changed_labels']} labels changed",
            "changes": changes,
            "annotations_used": report.get("used"),
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
        }
        config_lib.dump(config, work / "resolved_config.json", extra={"runner": runner or "FnApiRunner"})
        ctr_retrain._write_json(work / "decision.json", decision)
        shutil.rmtree(work / "annotations")  # links into ROOT; inputs.json says what they were
        (work / "changes.json").unlink()
        base_file.unlink()
        os.rename(work, mroot / date)
        stage.point()
        ctr_retrain._point_current(mroot, date)
    ctr_retrain._tidy(mroot)
    _log.info("retrain crowd %s: %s", date, decision["reason"])
    return decision
