"""``headrace schedule ctr``: the nightly job, and the commands a scheduler runs for one date.

    headrace schedule ctr --logs ROOT --models MROOT [--golden FILE] [--scores SROOT]
        (--date D | --since D [--until D]) [--dry-run] [-- retrain flags...]

For each date, in order (`day_commands`, the one list cron, Airflow and this command all run):

    score    headrace run ctr-score --model MROOT/current --input 'ROOT/dt=D/*' --output SROOT/dt=D
             the model in service scores the day's traffic (only with --scores, once there is a model)
    retrain  headrace retrain ctr --logs ROOT --date D --models MROOT ...: ingest, warm start, gate, promote

A date stops the run when a command fails (exit status of the failing command): a later date is never
trained over a missing one. Because `retrain ctr` is idempotent (a finished date does nothing and
writes nothing) and a scored date is skipped, ``--since`` is catch-up: after a night the machine was down,
the next night's run does the missed date first. ``--until`` defaults to yesterday (a day's logs are
complete once it is over).

Cron (schedule/crontab) runs this command each night; Airflow runs `day_commands` per task
(schedule/airflow_dag.py: one DAG run per date, retries, catch-up, a date after the one before).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from headrace.core.errors import ConfigError

__all__ = ["SKIPPED", "bash_command", "dates_between", "day_commands", "main"]

SKIPPED = 99  # the exit status Airflow's BashOperator marks a task skipped by (skip_on_exit_code)

_log = logging.getLogger("headrace.schedule")


def day_commands(
    date: str,
    *,
    logs: str,
    models: str,
    golden: str = "",
    scores: str = "",
    headrace: str = "headrace",
    retrain_args: Sequence[str] = (),
) -> list[tuple[str, list[str]]]:
    """``[(task name, argv)]`` for one date: ``score`` (with `scores`) then ``retrain``. `date` may be a
    template Airflow fills in (``{{ ds }}``)."""
    out = []
    if scores:
        score = [headrace, "run", "ctr-score", "--model", f"{models}/current"]
        score += ["--input", f"{logs}/dt={date}/*", "--output", f"{scores}/dt={date}", "--overwrite"]
        out.append(("score", score))
    retrain = [headrace, "retrain", "ctr", "--logs", logs, "--date", date, "--models", models]
    if golden:
        retrain += ["--golden", golden]
    out.append(("retrain", [*retrain, *retrain_args]))
    return out


def bash_command(name: str, argv: Sequence[str], models: str) -> str:
    """One task of `day_commands` as a shell line (Airflow's BashOperator): ``score`` exits `SKIPPED` while
    nothing is in service yet, as `main` skips it."""
    line = shlex.join(argv)
    if name == "score":
        return f"test -e {shlex.quote(models + '/current')} || exit {SKIPPED}; {line}"
    return line


def dates_between(since: str, until: str) -> list[str]:
    """Every date from `since` to `until`, both included (YYYY-MM-DD)."""
    try:
        first, last = datetime.date.fromisoformat(since), datetime.date.fromisoformat(until)
    except ValueError as exc:
        raise ConfigError(f"--since/--until: {exc} (expected YYYY-MM-DD)") from None
    if last < first:
        raise ConfigError(f"--until {until} is before --since {since}")
    return [(first + datetime.timedelta(days=k)).isoformat() for k in range((last - first).days + 1)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headrace schedule ctr", description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", required=True, help="ROOT with dt=YYYY-MM-DD/ folders")
    parser.add_argument("--models", required=True, help="MROOT of the retrained models")
    parser.add_argument("--golden", default="", help="the fixed golden set the gate compares on")
    parser.add_argument(
        "--scores", default="", help="SROOT: score each day's traffic with the model in service"
    )
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--date", help="one date")
    when.add_argument("--since", help="every date from this one (catch-up)")
    parser.add_argument("--until", default="", help="last date with --since (default yesterday)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return parser


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] != "ctr":
        raise ConfigError("headrace schedule: expected `schedule ctr` (the one scheduled job)")
    argv = argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.date:
        dates = dates_between(args.date, args.date)
    else:
        until = args.until or (datetime.date.today() - datetime.timedelta(days=1)).isoformat()
        dates = dates_between(args.since, until)
    headrace = str(Path(sys.executable).parent / "headrace")
    for date in dates:
        for name, command in day_commands(
            date,
            logs=args.logs,
            models=args.models,
            golden=args.golden,
            scores=args.scores,
            headrace=headrace,
            retrain_args=extra,
        ):
            if name == "score" and (
                not (Path(args.models) / "current").exists()
                or (Path(args.scores) / f"dt={date}" / "report.json").exists()
            ):
                continue  # nothing in service yet, or the day is scored
            print(shlex.join(command), flush=True)
            if args.dry_run:
                continue
            code = subprocess.run(command, check=False).returncode
            if code:
                _log.error("schedule %s: %s failed (exit %d); later dates wait for it", date, name, code)
                return code
    return 0
