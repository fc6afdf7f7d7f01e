"""Scheduling: the commands of a day parse with the CLI and check their inputs, `schedule ctr` walks the
dates in order, the crontab line runs as cron runs it, and the Airflow DAG runs the same commands."""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

from headrace.pipelines.ctr_data import generate
from headrace.runners import cli, schedule

ROOT = Path(__file__).resolve().parents[2]
HEADRACE = str(Path(sys.executable).parent / "headrace")


@pytest.fixture
def tree(tmp_path) -> dict[str, str]:
    """Two days of logs, a golden file and a model root whose `current` names a (stand-in) SavedModel."""
    logs = tmp_path / "logs"
    for date in ("2026-11-01", "2026-11-02"):
        generate(logs / f"dt={date}" / "part-0.tsv", 20, seed=1)
    generate(tmp_path / "golden.tsv", 20, seed=2)
    models = tmp_path / "models"
    (models / "2026-10-31" / "model" / "saved_model").mkdir(parents=True)
    (models / "2026-10-31" / "model" / "saved_model" / "saved_model.pb").write_bytes(b"")
    os.symlink("2026-10-31", models / "current")
    return {
        "logs": str(logs),
        "models": str(models),
        "golden": str(tmp_path / "golden.tsv"),
        "scores": str(tmp_path / "scores"),
    }


def test_each_command_of_a_day_parses_and_checks_its_inputs(tree, capsys):
    tasks = schedule.day_commands("2026-11-02", **tree)
    assert [name for name, _ in tasks] == ["score", "retrain"]
    for _, argv in tasks:
        assert argv[0] == "headrace"
        assert cli.main([*argv[1:], "--dry-run"]) == 0, capsys.readouterr().err
    assert '"date": "2026-11-02"' in capsys.readouterr().out
    missing = schedule.day_commands("2026-11-09", **tree)
    for _, argv in missing:  # a day without logs fails up front, naming what is missing
        assert cli.main([*argv[1:], "--dry-run"]) != 0
    assert "dt=2026-11-09" in capsys.readouterr().err


def _schedule(logs: str, models: str, scores: str) -> list[str]:
    return [HEADRACE, "schedule", "ctr", "--logs", logs, "--models", models, "--scores", scores]


def test_schedule_walks_the_dates_in_order_and_skips_scoring_until_a_model_serves(tree, tmp_path):
    dates = ["--since", "2026-11-01", "--until", "2026-11-03"]
    out = subprocess.run(
        [
            *_schedule(tree["logs"], str(tmp_path / "empty"), tree["scores"]),
            *dates,
            "--dry-run",
            "--",
            "--set",
            "train.steps=5",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert [shlex.split(line)[1:2] + shlex.split(line)[6:7] for line in out] == [
        ["retrain", "2026-11-01"],
        ["retrain", "2026-11-02"],
        ["retrain", "2026-11-03"],
    ]
    assert all(line.endswith("--set train.steps=5") for line in out)
    served = subprocess.run(
        [*_schedule(tree["logs"], tree["models"], tree["scores"]), "--date", "2026-11-02", "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert [shlex.split(line)[1] for line in served] == ["run", "retrain"]
    bad = subprocess.run(
        [HEADRACE, "schedule", "ctr", "--logs", "x", "--models", "y", "--since", "2026-13-01"]
    )
    assert bad.returncode == 2


def _cron_command(tree) -> str:
    """The crontab's job line, its command as cron hands it to /bin/sh, pointed at `tree`."""
    lines = [ln for ln in (ROOT / "schedule" / "crontab").read_text().splitlines() if ln and ln[0].isdigit()]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    assert len(fields) == 6 and fields[:5] == ["30", "2", "*", "*", "*"]
    command = fields[5].replace("\\%", "%")  # cron turns an unescaped % into a newline
    command = command.replace("cd /srv/headrace && .venv/bin/headrace", HEADRACE)
    for key in ("logs", "models", "scores"):
        command = command.replace(f"/data/ctr/{key}", tree[key])
    command = command.replace("/data/ctr/golden.tsv", tree["golden"])
    return command.split(" >> ")[0]


def test_the_crontab_line_runs_as_cron_runs_it(tree):
    out = subprocess.run(
        ["/bin/sh", "-c", _cron_command(tree) + " --dry-run"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    yesterday = (datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=1)).isoformat()
    retrains = [shlex.split(line) for line in out if shlex.split(line)[1] == "retrain"]
    assert retrains[0][6] == "2026-11-01" and retrains[-1][6] == yesterday
    assert len(retrains) == (datetime.date.fromisoformat(yesterday) - datetime.date(2026, 11, 1)).days + 1


def _airflow_stand_in(variables: dict[str, str]) -> dict[str, types.ModuleType]:
    """Just enough of Airflow's API to run the DAG file where Airflow is not installed: the tasks made."""
    made = []

    class DAG:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class BashOperator:
        def __init__(self, **kwargs):
            self.kwargs, self.upstream = kwargs, []
            made.append(self)

        def __rshift__(self, other):
            other.upstream.append(self)
            return other

    class Variable:
        @staticmethod
        def get(name, default_var=None):
            return variables.get(name, default_var)

    airflow = types.ModuleType("airflow")
    airflow.DAG, airflow.made = DAG, made
    models = types.ModuleType("airflow.models")
    models.Variable = Variable
    operators = types.ModuleType("airflow.operators")
    bash = types.ModuleType("airflow.operators.bash")
    bash.BashOperator = BashOperator
    return {
        "airflow": airflow,
        "airflow.models": models,
        "airflow.operators": operators,
        "airflow.operators.bash": bash,
    }


def test_the_airflow_dag_runs_the_days_commands(tree, monkeypatch):
    dag_file = ROOT / "schedule" / "airflow_dag.py"
    variables = {f"headrace_{k}": v for k, v in tree.items()} | {"headrace_bin": HEADRACE}
    try:
        import airflow  # noqa: F401
    except ImportError:
        for name, module in _airflow_stand_in(variables).items():
            monkeypatch.setitem(sys.modules, name, module)
        namespace = {"__name__": "headrace_dag"}
        exec(compile(dag_file.read_text(), str(dag_file), "exec"), namespace)
        dag = namespace["dag"]
        assert dag.kwargs["catchup"] and dag.kwargs["max_active_runs"] == 1
        assert dag.kwargs["default_args"]["retries"] >= 1 and dag.kwargs["default_args"]["depends_on_past"]
        tasks = {t.kwargs["task_id"]: t for t in sys.modules["airflow"].made}
        assert list(tasks) == ["score", "retrain"] and tasks["retrain"].upstream == [tasks["score"]]
        assert tasks["retrain"].kwargs["trigger_rule"] == "none_failed"  # runs after a skipped score
        commands = {k: t.kwargs["bash_command"] for k, t in tasks.items()}
    else:  # pragma: no cover - where Airflow is installed, its own loader reads the file
        from airflow.models import DagBag

        bag = DagBag(dag_folder=str(dag_file), include_examples=False)
        assert not bag.import_errors, bag.import_errors
        dag = bag.get_dag("headrace_retrain_ctr")
        assert dag.catchup and dag.max_active_runs == 1
        commands = {t.task_id: t.bash_command for t in dag.tasks}
    # Rendered for a date as Airflow renders {{ ds }}, each line runs (checked with --dry-run).
    for name, line in commands.items():
        rendered = line.replace("{{ ds }}", "2026-11-02") + " --dry-run"
        done = subprocess.run(["/bin/sh", "-c", rendered], capture_output=True, text=True)
        assert done.returncode == 0, (name, rendered, done.stderr[-2000:])
    unserved = (
        commands["score"].replace(tree["models"], tree["models"] + "-none").replace("{{ ds }}", "2026-11-02")
    )
    assert subprocess.run(["/bin/sh", "-c", unserved]).returncode == schedule.SKIPPED
