"""The example pipeline: parsing and rejects, counts that reconcile, and the same records on every runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from headrace.pipelines.example import (
    EXAMPLE_SPEC,
    ExampleConfig,
    build_example,
    generate_lines,
    is_eval,
    parse_line,
)
from headrace.runners.beam_runner import run_pipeline
from headrace.transforms.io import Line, Rejected
from headrace.transforms.tfrecord import read_examples


@pytest.mark.parametrize(
    "text, reason",
    [
        ("a,1,2,3", "field count: expected 7"),
        (",1,2,3,4,,0", "field id: empty"),
        ("a,1,x,3,4,,0", "field x1: not a number: 'x'"),
        ("a,1,2,inf,4,,0", "field x2: not finite"),
        ("a,1,2,3,4,1 b,0", "field tokens: not space-separated integers"),
        ("a,1,2,3,4,100,0", "field tokens: ids must be in [0, 100)"),
        ("a,1,2,3,4,,yes", "field label: expected 0 or 1, got 'yes'"),
    ],
)
def test_bad_lines_are_rejected_naming_the_field(text, reason):
    parsed = parse_line(Line("in.csv", 7, text))
    assert isinstance(parsed, Rejected)
    assert parsed.reason.startswith(reason)
    assert (parsed.source, parsed.line, parsed.text) == ("in.csv", 7, text)


def test_good_line_parses():
    assert parse_line(Line("in.csv", 2, "r1,0.5,-1,2,0,3 4,1")) == {
        "id": "r1",
        "dense": [0.5, -1.0, 2.0, 0.0],
        "tokens": [3, 4],
        "label": 1,
    }


def _reference(n: int, malformed_every: int, eval_fraction: float):
    """What the pipeline must write, computed without Beam."""
    train, evals, rejected = {}, {}, []
    for line in generate_lines(0, 0, n, malformed_every):
        parsed = parse_line(line)
        if isinstance(parsed, Rejected):
            rejected.append(parsed)
        elif is_eval(parsed["id"], eval_fraction):
            evals[parsed["id"]] = parsed
        else:
            train[parsed["id"]] = parsed
    return train, evals, rejected


def _check_split(records, expected):
    got = {bytes(r["id"].item()).decode(): r for r in records}
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        np.testing.assert_allclose(got[key]["dense"], want["dense"], rtol=1e-6)
        assert got[key]["tokens"].tolist() == want["tokens"]
        assert int(got[key]["label"]) == want["label"]


def test_outputs_equal_a_plain_python_reference_and_counts_reconcile(example_output):
    train, evals, rejected = _reference(4000, 100, 0.1)
    _check_split(read_examples(str(example_output / "train-*.tfrecord"), EXAMPLE_SPEC), train)
    _check_split(read_examples(str(example_output / "eval-*.tfrecord"), EXAMPLE_SPEC), evals)
    report = json.loads((example_output / "report.json").read_text())
    assert report["read"] == 4000 == report["train"] + report["eval"] + report["rejected"]
    assert (report["train"], report["eval"], report["rejected"]) == (
        len(train),
        len(evals),
        len(rejected),
    )
    lines = (example_output / "rejected-00000-of-00001.jsonl").read_text().splitlines()
    got = sorted((r["line"], r["reason"]) for r in map(json.loads, lines))
    assert got == sorted((r.line, r.reason) for r in rejected)
    config = json.loads((example_output / "resolved_config.json").read_text())
    assert config["num_records"] == 4000 and config["run"]["runner"] == "FnApiRunner"


def test_csv_input_rejects_name_file_and_line(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("id,x0,x1,x2,x3,tokens,label\nr1,1,2,3,4,5 6,1\nr2,1,2,3,4,,2\nr3,1,2,3\nr4,0,0,0,0,,0\n")
    out = tmp_path / "out"
    run_pipeline(build_example, ExampleConfig(output=str(out), input=str(src), shards=2))
    report = json.loads((out / "report.json").read_text())
    assert (report["read"], report["rejected"], report["train"] + report["eval"]) == (4, 2, 2)
    rejected = [json.loads(x) for x in (out / "rejected-00000-of-00001.jsonl").read_text().splitlines()]
    assert sorted((r["source"], r["line"], r["reason"].split(":")[0]) for r in rejected) == [
        (str(src), 3, "field label"),
        (str(src), 4, "field count"),
    ]


@pytest.mark.flink
def test_flink_writes_the_same_records_as_fnapi(tmp_path, flink_jar, example_output):
    """Without --job_endpoint, run_pipeline starts a job server for the run and stops it after."""
    out = tmp_path / "flink"
    before = set(_job_servers_of_this_process())  # the session's shared one, if started
    result = run_pipeline(
        build_example,
        ExampleConfig(output=str(out), num_records=4000, malformed_every=100),
        runner="FlinkRunner",
        beam_args=["--parallelism=2"],
    )
    assert result.runner == "FlinkRunner"
    assert set(_job_servers_of_this_process()) == before
    for split in ("train", "eval"):
        ours = sorted(
            EXAMPLE_SPEC.encode(_as_record(r))
            for r in read_examples(str(out / f"{split}-*.tfrecord"), EXAMPLE_SPEC)
        )
        ref = sorted(
            EXAMPLE_SPEC.encode(_as_record(r))
            for r in read_examples(str(example_output / f"{split}-*.tfrecord"), EXAMPLE_SPEC)
        )
        assert len(ours) > 0 and ours == ref, split
    flink_report = json.loads((out / "report.json").read_text())
    assert flink_report == json.loads((example_output / "report.json").read_text())
    assert sorted(p.name for p in out.glob("train-*")) == sorted(
        p.name for p in example_output.glob("train-*")
    )


def _job_servers_of_this_process() -> list[int]:
    """Pids of Flink job-server JVMs whose parent is this process."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"job-server" in cmd:
            pids.append(int(proc.name))
    return pids


def _as_record(decoded: dict) -> dict:
    return {k: (v.item() if k == "id" else v) for k, v in decoded.items()}
