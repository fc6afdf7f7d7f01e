"""ctr-score: RunInference's scores equal the SavedModel called directly, every line is scored or
rejected with its field named, and Flink gives the same scores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from headrace.core.errors import InputError
from headrace.models.criteo import FIELDS
from headrace.pipelines import ctr_score
from headrace.pipelines.ctr_data import generate
from headrace.runners.beam_runner import run_pipeline
from headrace.runners.train_ctr import CTRTrainConfig, train_and_evaluate


@pytest.fixture(scope="module")
def model(ctr_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("score-model") / "model"
    train_and_evaluate(
        CTRTrainConfig(
            data=str(ctr_shards),
            output=str(out),
            steps=10,
            batch_size=128,
            embedding_dim=8,
            hidden=(16,),
            capacity=1 << 14,
            mesh="",
            log_every_seconds=60,
        )
    )
    return out


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("score-logs")
    generate(root / "a.tsv", 700, seed=5)
    unlabelled = root / "b.tsv"
    generate(root / "tmp.tsv", 300, seed=6)
    unlabelled.write_text(
        "".join(ln.split("\t", 1)[1] + "\n" for ln in (root / "tmp.tsv").read_text().splitlines())
    )
    (root / "tmp.tsv").unlink()
    with open(root / "a.tsv", "a") as f:
        f.write("1\t2\t3\n")  # a field count
        f.write("2" + "\t" * 39 + "\n")  # a label
        f.write("0\t1\tx" + "\t" * 37 + "\n")  # I2 not an integer
    with open(root / "a.tsv", "ab") as f:
        f.write(b"0\t\xff" + b"\t" * 38 + b"\n")  # not UTF-8: left out by ReadLines itself
    return root


def _reference(saved_model: str, path: Path) -> dict[int, float]:
    """Line number -> the SavedModel's probability, called directly on each valid line."""
    serve = tf.saved_model.load(saved_model).signatures["serving_default"]
    rows = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        parts = line.split("\t")
        fields = parts[1:] if len(parts) == 40 else parts
        label_ok = len(parts) == 39 or parts[0] in ("0", "1")
        if len(fields) == 39 and label_ok and all(v == "" or v.lstrip("-").isdigit() for v in fields[:13]):
            rows[number] = fields
    numbers = sorted(rows)
    feed = {f: tf.constant([rows[n][k] for n in numbers]) for k, f in enumerate(FIELDS)}
    return dict(zip(numbers, serve(**feed)["probability"].numpy().tolist()))


def _scores(out: Path) -> dict[tuple[str, int], tuple[float, str]]:
    got = {}
    for shard in sorted(out.glob("scores-*.tsv")):
        lines = shard.read_text().splitlines()
        assert lines[0] == "source\tline\tprobability\tlabel"
        for line in lines[1:]:
            source, number, p, label = line.split("\t")
            got[(Path(source).name, int(number))] = (float(p), label)
    return got


def _score(model, logs, out, **kwargs):
    config = ctr_score.CtrScoreConfig(model=str(model), input=str(logs / "*.tsv"), output=str(out), shards=2)
    return run_pipeline(ctr_score.build_ctr_score, config, **kwargs)


def test_scores_equal_the_saved_model_and_every_line_is_accounted_for(model, logs, tmp_path):
    _score(model, logs, tmp_path / "out")
    got = _scores(tmp_path / "out")
    saved = str(model / "saved_model")
    for name in ("a.tsv", "b.tsv"):
        ref = _reference(saved, logs / name)
        mine = {n: p for (f, n), (p, _) in got.items() if f == name}
        assert set(mine) == set(ref), name
        np.testing.assert_allclose([mine[n] for n in ref], list(ref.values()), rtol=1e-5, atol=1e-7)
    assert {label for (f, _), (_, label) in got.items() if f == "b.tsv"} == {""}  # unlabelled lines
    assert {label for (f, _), (_, label) in got.items() if f == "a.tsv"} == {"0", "1"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["read"] == 1004 and report["scored"] == 1000 and report["rejected"] == 4
    assert report["labelled"] == 700
    assert report["rejected_reasons"] == {"I2": 1, "field count": 1, "label": 1, "not UTF-8": 1}, report
    rejected = [
        json.loads(x) for x in (tmp_path / "out" / "rejected-00000-of-00001.jsonl").read_text().splitlines()
    ]
    assert sorted(r["line"] for r in rejected) == [701, 702, 703, 704]
    assert any(r["reason"] == "I2: 'x' is not an integer" for r in rejected)


def test_model_paths_resolve_and_a_missing_model_is_a_clear_error(model, tmp_path):
    link = tmp_path / "current"
    os.symlink(model, link)  # a retrain root's `current`, or any symlink, is resolved at build time
    assert ctr_score.resolve_model(str(link)) == os.path.realpath(model / "saved_model")
    assert ctr_score.resolve_model(str(model / "saved_model")) == str(model / "saved_model")
    with pytest.raises(InputError, match=r"no saved_model\.pb"):
        ctr_score.resolve_model(str(tmp_path))


@pytest.mark.flink
def test_flink_gives_the_same_scores(model, logs, tmp_path, flink):
    _score(model, logs, tmp_path / "local")
    _score(model, logs, tmp_path / "flink", runner="FlinkRunner", beam_args=[*flink, "--parallelism=2"])
    local, remote = _scores(tmp_path / "local"), _scores(tmp_path / "flink")
    assert set(local) == set(remote) and len(local) == 1000
    np.testing.assert_allclose([remote[k][0] for k in local], [v[0] for v in local.values()], rtol=1e-6)
    assert json.loads((tmp_path / "flink" / "report.json").read_text())["rejected"] == 4
