"""`headrace train lm` on text-ingest rows: both attention kinds train through the shared loop."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import textwrap

import pytest

from headrace.pipelines.text import TextIngestConfig, build_text_ingest
from headrace.runners import cli
from headrace.runners.beam_runner import run_pipeline

SMALL = [
    "--layers",
    "1",
    "--d-model",
    "32",
    "--heads",
    "4",
    "--ffn",
    "64",
    "--batch-size",
    "8",
    "--steps",
    "30",
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    (root / "in").mkdir()
    for module in (argparse, dataclasses, inspect, json, textwrap):
        (root / "in" / f"{module.__name__}.txt").write_text(inspect.getsource(module))
    out = root / "rows"
    run_pipeline(
        build_text_ingest,
        TextIngestConfig(
            input=str(root / "in" / "*.txt"), output=str(out), vocab_size=256, seq_len=32, eval_fraction=0.2
        ),
    )
    return out


@pytest.mark.parametrize("attention", ["multi_head", "talking_heads"])
def test_lm_trains_on_the_mesh_and_reports_perplexity(rows, tmp_path, attention):
    out = tmp_path / attention
    argv = ["train", "lm", "--data", str(rows), "--output", str(out), "--attention", attention]
    assert cli.main([*argv, "--mesh", "batch=4,model=2", "--learning-rate", "0.01", *SMALL]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["attention"] == attention and m["steps"] == 30 and m["devices"] == 8
    assert m["loss_last"] < m["loss_first"] - 0.5  # learning, from about log(256) = 5.5
    assert 1 < m["perplexity"] < 256 and m["eval_tokens"] > 100 and m["tokens_per_sec"] > 0
    for name in ("curves.png", "tokenizer.model", "resolved_config.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.*"))


def test_lm_trains_without_a_mesh(rows, tmp_path):
    argv = ["train", "lm", "--data", str(rows), "--output", str(tmp_path / "m"), "--mesh", ""]
    assert cli.main([*argv, *SMALL[:-2], "--steps", "5"]) == 0
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert m["steps"] == 5 and m["mesh"] == "" and "devices" not in m


def test_heads_that_do_not_divide_the_model_dimension_are_refused(rows, tmp_path, capsys):
    argv = ["train", "lm", "--data", str(rows), "--output", str(tmp_path / "m"), "--mesh", "batch=4,model=2"]
    assert cli.main([*argv, "--heads", "3", "--d-model", "48", "--steps", "1"]) == 2
    assert "--heads 3 does not divide the mesh's model dimension (2)" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_generate_streams_tokens_with_the_cache_and_is_reproducible(rows, tmp_path, capsys):
    model = tmp_path / "m"
    argv = ["train", "lm", "--data", str(rows), "--output", str(model), "--mesh", "batch=4,model=2"]
    assert cli.main([*argv, "--learning-rate", "0.01", *SMALL]) == 0
    capsys.readouterr()
    gen = ["generate", "lm", "--model", str(model), "--prompt", "def", "--max-tokens", "12"]
    results = []
    for _ in range(2):
        assert cli.main([*gen, "--temperature", "0"]) == 0
        out = capsys.readouterr().out
        results.append(json.loads(out[out.index("{") :]))
    first, second = results
    assert first["text"] == second["text"] and 0 < first["tokens"] <= 12  # greedy: the same text
    assert first["time_to_first_token_s"] > 0
    # The unsharded generator reproduces the trained (sharded) model, and its cache changes nothing:
    # greedy decoding without a cache (the full forward pass on the prefix, every step) gives the same
    # tokens, one after another.
    from headrace.runners.generate_lm import load_model

    transformer, sp = load_model(str(model))
    prefix, expected = sp.encode("def"), []
    for _ in first["ids"]:
        n = len(prefix)
        logits = transformer([prefix], [[1] * n], [list(range(n))]).numpy()
        expected.append(int(logits[0, -1].argmax()))
        prefix = [*prefix, expected[-1]]
    assert first["ids"] == expected
