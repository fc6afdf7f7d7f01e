"""Airflow DAG: headrace's nightly CTR retraining, one DAG run per date.

Copy (or symlink) this file into Airflow's dags folder on a machine where headrace is installed. Paths
come from Airflow Variables (``headrace_logs``, ``headrace_models``, ``headrace_golden``,
``headrace_scores``, ``headrace_bin``) or these defaults.

* one run per day (``@daily``; the run for date D starts once D is over, and its ``ds`` is D);
* ``catchup=True`` from ``start_date``: a scheduler that was down runs the missed dates, oldest first;
* ``depends_on_past`` and ``max_active_runs=1``: a date waits for the one before (a warm start needs it);
* ``retries=2`` five minutes apart: `headrace retrain ctr` resumes where a killed or failed attempt
  stopped, and a finished date is a no-op, so a retry is always safe.

The tasks are `headrace.runners.schedule.day_commands` for ``{{ ds }}``: the same commands cron's
``headrace schedule ctr`` runs.
"""

from __future__ import annotations

import datetime

from airflow import DAG
from airflow.models import Variable
from airflow.operators.bash import BashOperator

from headrace.runners.schedule import bash_command, day_commands


def _setting(name: str, default: str) -> str:
    return Variable.get(f"headrace_{name}", default_var=default)


with DAG(
    dag_id="headrace_retrain_ctr",
    schedule="@daily",
    start_date=datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC),
    catchup=True,
    max_active_runs=1,
    default_args={
        "retries": 2,
        "retry_delay": datetime.timedelta(minutes=5),
        "depends_on_past": True,
    },
    tags=["headrace"],
) as dag:
    models = _setting("models", "/data/ctr/models")
    previous = None
    for name, argv in day_commands(
        "{{ ds }}",
        logs=_setting("logs", "/data/ctr/logs"),
        models=models,
        golden=_setting("golden", "/data/ctr/golden.tsv"),
        scores=_setting("scores", "/data/ctr/scores"),
        headrace=_setting("bin", "headrace"),
    ):
        # `score` exits 99 (skipped) until a model is in service; `retrain` runs after a skipped score.
        task = BashOperator(
            task_id=name,
            bash_command=bash_command(name, argv, models),
            skip_on_exit_code=99,
            trigger_rule="none_failed",
        )
        if previous is not None:
            previous >> task
        previous = task
