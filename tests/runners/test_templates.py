"""Flex Templates: the files in templates/ are what the configs generate, every parameter is a CLI flag
of the pipeline (and every flag a parameter), and the launcher's arguments reach the config."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError
from headrace.pipelines.ctr_data import generate
from headrace.runners import cli, commands, templates

ROOT = Path(__file__).resolve().parents[2]
DATAFLOW = [
    "--project=headrace-test",
    "--region=europe-west1",
    "--temp_location=gs://headrace-test/tmp",
    "--sdk_container_image=apache/beam_python3.11_sdk:2.62.0",
]


def test_the_committed_templates_are_what_the_configs_generate():
    assert templates.main(["check", "--dir", str(ROOT / "templates")]) == 0
    assert sorted(p.name for p in (ROOT / "templates").iterdir() if p.is_dir()) == sorted(commands.PIPELINES)


def _cli_flags(name: str) -> dict[str, str]:
    """The config flags of `headrace run NAME`, as the CLI builds them: flag -> help."""
    command = commands.PIPELINES[name]
    command.load()
    parser = argparse.ArgumentParser()
    cli._add_config_flags(parser, config_lib.get(command.default_config))
    group = next(g for g in parser._action_groups if g.title.startswith("config fields"))
    return {a.option_strings[0]: a.help for a in group._group_actions}


@pytest.mark.parametrize("name", sorted(commands.PIPELINES))
def test_metadata_parameters_are_the_cli_flags(name):
    meta = json.loads((ROOT / "templates" / name / "metadata.json").read_text())
    flags = _cli_flags(name)
    params = {"--" + p["name"].replace("_", "-"): p for p in meta["parameters"]}
    assert set(params) == set(flags), (name, set(params) ^ set(flags))
    for flag, p in params.items():
        assert re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_]*", p["name"]), p["name"]  # Dataflow's parameter names
        assert p["isOptional"] == ("(required)" not in flags[flag]), flag
        cli_help = re.split(r" \((default: |required\))", flags[flag])[0]  # the field's help alone
        assert not cli_help or p["helpText"].startswith(cli_help), (flag, p["helpText"], flags[flag])
    assert not params["--output"]["isOptional"]
    dockerfile = (ROOT / "templates" / name / "Dockerfile").read_text()
    from importlib import metadata

    assert f"FROM apache/beam_python3.11_sdk:{metadata.version('apache-beam')}" in dockerfile
    assert f"HEADRACE_TEMPLATE_PIPELINE={name}" in dockerfile


EVAL = ["--eval_fraction", "0.2"]  # the `--name value` form too


def test_launcher_arguments_become_the_cli_flags_and_validate_on_dataflow(tmp_path, capsys):
    generate(tmp_path / "logs.tsv", 50, seed=1)
    argv = templates.template_argv(
        "ctr-ingest",
        [
            f"--input={tmp_path / 'logs.tsv'}",
            "--output=gs://headrace-test/out",
            "--shards=3",
            *EVAL,
            *DATAFLOW,
        ],
    )
    assert argv[:5] == ["run", "ctr-ingest", "--runner", "DataflowRunner", "--detach"]
    assert argv[argv.index("--shards") : argv.index("--shards") + 2] == ["--shards", "3"]
    assert "--eval-fraction" in argv and "--project=headrace-test" in argv
    # The job graph builds and validates for Dataflow (dry run: nothing is submitted).
    assert cli.main([*argv, "--dry-run"]) == 0, capsys.readouterr().err
    assert "validated for DataflowRunner" in capsys.readouterr().out


def test_bad_template_arguments_are_refused():
    with pytest.raises(ConfigError, match="not true or false"):
        templates.template_argv("crowd-labels", ["--estimate_group_strength=yes"])
    assert "--no-estimate-group-strength" in templates.template_argv(
        "crowd-labels", ["--estimate_group_strength=false"]
    )
    with pytest.raises(ConfigError, match="runs on Dataflow"):
        templates.template_argv("ctr-ingest", ["--runner=FlinkRunner"])


def test_detach_is_for_dataflow_only(tmp_path, capsys):
    generate(tmp_path / "logs.tsv", 20, seed=1)
    code = cli.main(
        [
            "run",
            "ctr-ingest",
            "--input",
            str(tmp_path / "logs.tsv"),
            "--output",
            str(tmp_path / "o"),
            "--detach",
        ]
    )
    assert code != 0 and "--detach submits to Dataflow" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
