"""retrain ctr: three dates (promote, promote, refuse a corrupted day), idempotence, warm start, SIGKILL
at each stage and resume, the lock."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from headrace.core.errors import InputError
from headrace.pipelines.ctr import CtrIngestConfig
from headrace.pipelines.ctr_data import generate
from headrace.runners import retrain
from headrace.runners.ctr_task import CTRTrainConfig

HEADRACE = str(Path(sys.executable).parent / "headrace")
DATES = ["2026-11-01", "2026-11-02", "2026-11-03"]
TRAIN = dict(
    batch_size=128,
    embedding_dim=8,
    hidden=(32, 16),
    capacity=1 << 14,
    mesh="batch=2",
    learning_rate=0.005,
    embedding_learning_rate=0.01,
    checkpoint_every=5,
    log_every_seconds=60,
)
SETS = [f"train.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in TRAIN.items()]


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    """Three days of planted-model logs (the third with every label flipped: a corrupted day) and a
    golden set from the same model."""
    root = tmp_path_factory.mktemp("retrain-logs")
    for i, date in enumerate(DATES):
        generate(root / f"dt={date}" / "part-0.tsv", 3000, seed=100 + i)
    bad = root / f"dt={DATES[2]}" / "part-0.tsv"
    lines = bad.read_text().splitlines()
    bad.write_text("".join(("1" if ln[0] == "0" else "0") + ln[1:] + "\n" for ln in lines))
    generate(root / "golden.tsv", 3000, seed=99)
    return root


def _config(logs: Path, mroot: Path, date: str, **kwargs) -> retrain.CTRRetrainConfig:
    return retrain.CTRRetrainConfig(
        logs=str(logs),
        date=date,
        models=str(mroot),
        golden=str(logs / "golden.tsv"),
        ingest=CtrIngestConfig(shards=2),
        train=CTRTrainConfig(**TRAIN),
        **kwargs,
    )


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every symlink's target under `root`."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_file():
            out[key] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def three_days(logs, tmp_path_factory) -> tuple[Path, list[dict]]:
    mroot = tmp_path_factory.mktemp("retrain-models") / "models"
    import tensorflow as tf

    # As other work in this process may leave it: these runs are compared with fresh CLI processes below.
    tf.random.set_seed(12345)
    return mroot, [retrain.retrain_ctr(_config(logs, mroot, d)) for d in DATES]


def test_three_dates_promote_promote_and_refuse_the_corrupted_day(three_days):
    mroot, (d1, d2, d3) = three_days
    assert d1["promoted"] and d1["base"] is None and "cold start" in d1["reason"]
    assert d2["promoted"] and d2["base"] == DATES[0]
    assert d2["candidate_auc"] >= d2["base_auc"] - 0.002
    assert not d3["promoted"] and d3["base"] == DATES[1]
    assert d3["candidate_auc"] < d3["base_auc"] - 0.1, d3  # flipped labels: far worse on the golden set
    assert "beyond" in d3["reason"]
    assert os.readlink(mroot / "current") == DATES[1]  # the refused model is not in service...
    on_disk = json.loads((mroot / DATES[2] / "decision.json").read_text())
    assert on_disk["promoted"] is False and on_disk["reason"] == d3["reason"]  # ...but kept, with why
    for date in DATES:
        day = mroot / date
        for name in ("decision.json", "evaluation.json", "report.json", "resolved_config.json"):
            assert (day / name).is_file(), (date, name)
        assert (day / "model" / "saved_model" / "saved_model.pb").is_file()
        report = json.loads((day / "report.json").read_text())
        assert report["read"] == report["train"] + report["eval"] + report["rejected"] == 3000
    assert not (mroot / ".work").exists()
    assert not list(mroot.glob(".*.lock"))


def test_rerunning_finished_dates_changes_no_byte(three_days, logs):
    mroot, _ = three_days
    before = _snapshot(mroot)
    for date in DATES:
        again = retrain.retrain_ctr(_config(logs, mroot, date))
        assert again["already_finished"]
    assert _snapshot(mroot) == before


def test_warm_start_continues_the_model_in_service(three_days, logs, tmp_path):
    mroot, _ = three_days
    warm = json.loads((mroot / DATES[1] / "model" / "metrics.json").read_text())
    cold_root = tmp_path / "cold"
    retrain.retrain_ctr(_config(logs, cold_root, DATES[1]))  # no current: a cold start on day 2
    cold = json.loads((cold_root / DATES[1] / "model" / "metrics.json").read_text())
    assert warm["loss_first"] < cold["loss_first"] - 0.02, (warm["loss_first"], cold["loss_first"])
    # The table came along: rows of day 1's ids, their counts and clocks (steps continue past day 1's).
    day1 = json.loads((mroot / DATES[0] / "model" / "metrics.json").read_text())
    assert warm["table_rows_used"] > day1["table_rows_used"] > cold["table_rows_used"] * 0.5
    assert warm["table_rows_used"] > cold["table_rows_used"]


def test_a_missing_day_and_a_bad_golden_line_are_clear_errors(logs, tmp_path):
    with pytest.raises(InputError, match=r"dt=2026-12-31"):
        retrain.retrain_ctr(_config(logs, tmp_path / "m", "2026-12-31"))
    golden = tmp_path / "golden.tsv"
    golden.write_text("1\t2\n")
    with pytest.raises(InputError, match=r"golden.tsv:1: expected label"):
        retrain.read_labelled_tsv(str(golden))
    assert not (tmp_path / "m" / "current").exists()


def _cli(logs: Path, mroot: Path, date: str, env_extra=None, **popen):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env_extra or {})}
    args = [HEADRACE, "retrain", "ctr", "--logs", str(logs), "--date", date, "--models", str(mroot)]
    args += ["--golden", str(logs / "golden.tsv"), "--set", "ingest.shards=2"]
    for s in SETS:
        args += ["--set", s]
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


# Train and promote (the resumed checkpoint, the rename without the symlink) in CI; the others are slow.
@pytest.mark.parametrize(
    "stage",
    [s if s in ("train", "promote") else pytest.param(s, marks=pytest.mark.slow) for s in retrain.STAGES],
)
def test_sigkill_in_each_stage_leaves_current_and_the_next_run_completes(stage, three_days, logs, tmp_path):
    reference_root, decisions = three_days
    mroot = tmp_path / "models"
    mroot.mkdir()
    shutil.copytree(reference_root / DATES[0], mroot / DATES[0])
    os.symlink(DATES[0], mroot / "current")

    killed = _cli(logs, mroot, DATES[1], {retrain.KILL_ENV: stage, retrain.KILL_ENV + "_AFTER": "1.5"})
    out, _ = killed.communicate(timeout=300)
    assert killed.returncode == -9, out[-3000:]
    assert f"retrain {DATES[1]}: {stage}" in out
    assert os.readlink(mroot / "current") == DATES[0]  # never moved by a killed run
    if stage == "promote":
        assert (mroot / DATES[1] / "decision.json").exists()  # renamed into place, not yet current
    else:
        assert not (mroot / DATES[1]).exists()
    assert (mroot / f".{DATES[1]}.lock").exists()  # left by the killed run: stale, taken over below

    again = _cli(logs, mroot, DATES[1])
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert "taking over the lock" in out
    decision = json.loads((mroot / DATES[1] / "decision.json").read_text())
    assert decision["promoted"] and os.readlink(mroot / "current") == DATES[1]
    # The same model as the run never killed: stages done are not redone, training resumed exactly.
    assert decision["candidate_auc"] == pytest.approx(decisions[1]["candidate_auc"], abs=1e-6)
    assert not (mroot / ".work").exists() and not (mroot / f".{DATES[1]}.lock").exists()


def test_a_live_lock_refuses_a_second_run_and_two_runs_at_once_write_once(three_days, logs, tmp_path):
    mroot = tmp_path / "models"
    mroot.mkdir()
    lock = retrain.Lock(mroot / f".{DATES[0]}.lock")
    with lock, pytest.raises(retrain.LockedError, match="another retrain of this date is running"):
        retrain.retrain_ctr(_config(logs, mroot, DATES[0]))
    assert not (mroot / DATES[0]).exists()

    runs = [_cli(logs, mroot, DATES[0]) for _ in range(2)]
    outs = [r.communicate(timeout=300)[0] for r in runs]
    codes = sorted(r.returncode for r in runs)
    # Either the second found the lock (exit 3), or it started after the first had finished the date.
    assert codes == [0, 3] or (codes == [0, 0] and sum('"already_finished": true' in o for o in outs) == 1), [
        o[-2000:] for o in outs
    ]
    assert json.loads((mroot / DATES[0] / "decision.json").read_text())["promoted"]


def test_command_line_flags_reach_the_nested_configs():
    from headrace.core import config as config_lib

    config = config_lib.apply_overrides(retrain.retrain_ctr_config(), SETS)
    assert dataclasses.asdict(config)["train"]["batch_size"] == 128
    assert config.train.hidden == (32, 16) and config.train.mesh == "batch=2"


def _contend(lock_path: str, marker: str, rounds: int) -> int:
    """Takes the lock `rounds` times where it can; holding it, owns `marker` alone. Returns the wins."""
    import time

    wins = 0
    for _ in range(rounds):
        try:
            with retrain.Lock(Path(lock_path)):
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another holder is in
                time.sleep(0.001)
                os.close(fd)
                os.unlink(marker)
                wins += 1
        except retrain.LockedError:
            pass
    return wins


def test_the_lock_admits_one_holder_at_a_time_under_contention(tmp_path):
    import multiprocessing

    lock, marker = str(tmp_path / ".d.lock"), str(tmp_path / "inside")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        wins = pool.starmap(_contend, [(lock, marker, 200)] * 4)
    assert sum(wins) > 0 and not os.path.exists(lock) and not os.path.exists(marker)
