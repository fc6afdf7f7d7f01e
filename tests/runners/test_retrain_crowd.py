"""retrain crowd: three days of annotations, each day's labels equal to crowd-labels on everything up to
it, changes listed where posteriors moved, idempotence, a kill and resume, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from headrace.core.errors import InputError
from headrace.pipelines.crowd import CrowdConfig, build_crowd_labels
from headrace.pipelines.crowd_data import generate
from headrace.runners import retrain, retrain_crowd
from headrace.runners.beam_runner import run_pipeline

DATES = ["2026-11-01", "2026-11-02", "2026-11-03"]
CROWD = CrowdConfig(partitions=4, iterations=30)
HEADRACE = str(Path(sys.executable).parent / "headrace")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Annotations of 600 tasks arriving over three days: day 1 the first 3 labels of tasks 0-399,
    day 2 the other 2 labels of those and 3 of tasks 400-599, day 3 the rest."""
    data = generate(
        tmp_path_factory.mktemp("crowd-src"), num_tasks=600, num_workers=60, labels_per_task=5, seed=3
    )
    lines = Path(data.annotations).read_text().splitlines()
    header, rows = lines[0], lines[1:]
    seen: dict[str, int] = {}
    days: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for row in rows:
        task = row.split(",")[0]
        k = seen.get(task, 0)
        seen[task] = k + 1
        number = int("".join(ch for ch in task if ch.isdigit()))
        if number < 400:
            days[0 if k < 3 else 1].append(row)
        else:
            days[1 if k < 3 else 2].append(row)
    out = tmp_path_factory.mktemp("crowd-days")
    for i, date in enumerate(DATES):
        (out / f"dt={date}").mkdir()
        (out / f"dt={date}" / "part-0.csv").write_text("\n".join([header, *days[i]]) + "\n")
    return out


def _config(root: Path, mroot: Path, date: str) -> retrain_crowd.CrowdRetrainConfig:
    return retrain_crowd.CrowdRetrainConfig(
        annotations_root=str(root), date=date, models=str(mroot), crowd=CROWD
    )


@pytest.fixture(scope="module")
def three_days(root, tmp_path_factory):
    mroot = tmp_path_factory.mktemp("crowd-models") / "models"
    return mroot, [retrain_crowd.retrain_crowd(_config(root, mroot, d)) for d in DATES]


def test_each_day_equals_crowd_labels_over_all_annotations_up_to_it(three_days, root, tmp_path):
    mroot, decisions = three_days
    assert [d["changes"]["tasks"] for d in decisions] == [400, 600, 600]
    assert [d["changes"]["new_tasks"] for d in decisions] == [400, 200, 0]
    assert os.readlink(mroot / "current") == DATES[2]
    for i, date in enumerate(DATES):
        merged = tmp_path / f"upto-{date}.csv"
        parts = [(root / f"dt={d}" / "part-0.csv").read_text().splitlines() for d in DATES[: i + 1]]
        merged.write_text("\n".join([parts[0][0], *(ln for p in parts for ln in p[1:])]) + "\n")
        out = tmp_path / f"ref-{date}"
        run_pipeline(
            build_crowd_labels,
            CrowdConfig(partitions=4, iterations=30, annotations=str(merged), output=str(out)),
        )
        ref = retrain_crowd.read_posteriors(out / "posteriors.csv")
        mine = retrain_crowd.read_posteriors(mroot / date / "labels" / "posteriors.csv")
        assert set(mine) == set(ref)
        np.testing.assert_allclose([mine[t] for t in ref], list(ref.values()), atol=1e-6)
        report = json.loads((mroot / date / "labels" / "report.json").read_text())
        assert report["used"] == sum(len(p) - 1 for p in parts)


def test_labels_change_only_where_the_posterior_moved(three_days):
    mroot, decisions = three_days
    for date, decision in zip(DATES[1:], decisions[1:]):
        rows = (mroot / date / "changes.csv").read_text().splitlines()[1:]
        assert len(rows) == decision["changes"]["changed_labels"]
        old = retrain_crowd.read_posteriors(mroot / decision["base"] / "labels" / "posteriors.csv")
        new = retrain_crowd.read_posteriors(mroot / date / "labels" / "posteriors.csv")
        for row in rows:
            task, before, after, move = row.split(",")
            assert before != after and float(move) > 0.05, row  # a flip is a real move, not a tie broken
            assert float(move) == pytest.approx(
                max(abs(a - b) for a, b in zip(new[task], old[task])), abs=1e-5
            )
    # Day 2 adds two labels to each of tasks 0-399: some of their labels change; day 3 adds none to them.
    assert decisions[1]["changes"]["changed_labels"] > 0


def test_rerunning_finished_dates_changes_no_byte(three_days, root):
    mroot, _ = three_days
    before = {str(p): p.read_bytes() for p in mroot.rglob("*") if p.is_file()}
    for date in DATES:
        assert retrain_crowd.retrain_crowd(_config(root, mroot, date))["already_finished"]
    assert {str(p): p.read_bytes() for p in mroot.rglob("*") if p.is_file()} == before


def test_a_kill_in_the_aggregation_resumes_to_the_same_labels(three_days, root, tmp_path):
    reference, _ = three_days
    mroot = tmp_path / "models"
    args = [
        HEADRACE,
        "retrain",
        "crowd",
        "--annotations-root",
        str(root),
        "--date",
        DATES[0],
        "--models",
        str(mroot),
    ]
    args += ["--set", "crowd.partitions=4", "--set", "crowd.iterations=30"]
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        retrain.KILL_ENV: "aggregate",
        retrain.KILL_ENV + "_AFTER": "1",
    }
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (mroot / "current").exists() and not (mroot / DATES[0]).exists()
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert os.readlink(mroot / "current") == DATES[0]
    assert (mroot / DATES[0] / "labels" / "labels.csv").read_bytes() == (
        reference / DATES[0] / "labels" / "labels.csv"
    ).read_bytes()


def test_a_missing_day_is_a_clear_error(root, tmp_path):
    with pytest.raises(InputError, match="dt=2026-12-31"):
        retrain_crowd.retrain_crowd(_config(root, tmp_path / "m", "2026-12-31"))
    assert not (tmp_path / "m").exists()
