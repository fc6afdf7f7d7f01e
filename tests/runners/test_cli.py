"""The `headrace` command: help, configs, one-line errors, and a pipeline run through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from headrace.runners import cli

HEADRACE = str(Path(sys.executable).parent / "headrace")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HEADRACE, *args], capture_output=True, text=True, timeout=300)


def test_console_script_help_and_configs():
    help_ = _run("--help")
    assert help_.returncode == 0 and "run PIPELINE" in help_.stdout
    listed = _run("configs", "list")
    assert listed.returncode == 0
    names = {line.split()[0] for line in listed.stdout.splitlines()}
    assert {"example", "mlp"} <= names
    shown = _run("configs", "show", "mlp", "--set", "model.hidden=64")
    assert json.loads(shown.stdout)["model"]["hidden"] == 64


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "example", "--shards", "many"], "--shards 'many': expected int"),
        (
            ["run", "example", "--output", "x", "--no-such-flag", "1"],
            "unknown flag '--no-such-flag'",
        ),
        (["run", "nope"], "unknown pipeline 'nope'"),
        (["run", "example", "--config", "mlp"], "is for `train mlp`"),
        (["train", "mlp", "--mesh", "batch=two"], "size of 'batch' must be an integer"),
        (["train", "mlp", "--set", "model.hiden=2"], "unknown config field 'hiden'"),
        (["configs", "show", "missing"], "unknown config 'missing'"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_flag_errors_are_one_line_and_exit_2(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("headrace: error: ")
    assert message in err


def test_input_errors_exit_1_without_a_traceback(tmp_path, capsys):
    code = cli.main(
        ["run", "example", "--input", str(tmp_path / "none-*.csv"), "--output", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 1 and "no files match" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_an_input_error_raised_inside_a_dofn_is_one_line_unless_verbose(tmp_path, capsys):
    # The priors file lacks the class columns: found by a DoFn while the pipeline runs, where Beam logs
    # the whole traceback before re-raising it.
    (tmp_path / "a.csv").write_text("task,worker,label\nt1,w1,a\nt1,w2,b\nt2,w1,a\n")
    (tmp_path / "p.csv").write_text("task,zzz\nt1,0.5\n")
    args = ["run", "crowd-labels", "--annotations", str(tmp_path / "a.csv"), "--task-priors"]
    args += [str(tmp_path / "p.csv"), "--method", "dawid_skene", "--output", str(tmp_path / "o")]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("headrace: error: --task-priors ") and "no column for class(es) a, b" in err
    assert not (tmp_path / "o").exists()
    assert cli.main([*args, "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_run_example_through_the_cli_with_flags_and_overrides(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(
        [
            "run",
            "example",
            "--output",
            str(out),
            "--num-records",
            "500",
            "--set",
            "shards=2",
            "--direct_num_workers=1",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["read"] == 500
    assert len(list(out.glob("train-*-of-00002.tfrecord"))) == 2
    resolved = json.loads((out / "resolved_config.json").read_text())
    assert resolved["shards"] == 2 and resolved["num_records"] == 500
    assert resolved["run"]["beam_args"] == ["--direct_num_workers=1"]
    # An existing output is not replaced without --overwrite.
    assert cli.main(["run", "example", "--output", str(out), "--num-records", "10"]) == 1
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["mlp", "ctr", "crowd-classifier", "unet3d"])
def test_train_with_a_bad_data_path_writes_nothing(tmp_path, capsys, model):
    out = tmp_path / "out"
    code = cli.main(["train", model, "--data", str(tmp_path / "typo"), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and f"--data {tmp_path / 'typo'}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no staging folder
