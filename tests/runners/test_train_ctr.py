"""train ctr: SavedModel = in-process model, resume, the command contract, and quality on planted data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from headrace.core import mesh as mesh_lib
from headrace.models.metrics import auc
from headrace.pipelines import ctr
from headrace.pipelines.ctr_data import (
    CAT_FIELDS,
    INFORMATIVE_CAT,
    INFORMATIVE_INT,
    INT_FIELDS,
    generate,
    planted_probability,
    raw_columns,
)
from headrace.runners import cli, loop
from headrace.runners.beam_runner import run_pipeline
from headrace.runners.ctr_task import CTRTask
from headrace.runners.train_ctr import CTRTrainConfig, train_and_evaluate

SMALL = dict(
    batch_size=128, embedding_dim=8, hidden=(32, 16), cross_layers=2, capacity=1 << 14, log_every_seconds=60
)


def test_saved_model_equals_the_in_process_model(ctr_shards, tmp_path):
    config = CTRTrainConfig(
        data=str(ctr_shards), model="dcn_v2", steps=20, min_count=2, mesh="batch=4,model=2", **SMALL
    )
    task = CTRTask(config)
    loop.Fit(task, tmp_path / "run", "", resume=False).run()
    task.export(tmp_path / "saved_model")
    serving = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"]
    batch = next(iter(ctr.dataset(str(ctr_shards), "eval", 96)))
    rows = task.table.lookup(task.ids(batch))
    ones = task._replicated(np.ones(39, np.float32))
    expected = mesh_lib.to_numpy(task.predict_step(task._batch(rows), ones))
    raw = raw_columns({k: v.numpy() for k, v in batch.items()})
    got = serving(**{k: tf.constant(v.astype(str)) for k, v in raw.items()})["probability"].numpy()
    assert got.shape == (96,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert set(serving.structured_input_signature[1]) == set(INT_FIELDS + CAT_FIELDS)


def test_resume_continues_exactly_where_the_run_stopped(ctr_shards, tmp_path):
    common = dict(
        data=str(ctr_shards), model="deepfm", min_count=2, export=False, mesh="batch=4,model=2", **SMALL
    )
    straight = train_and_evaluate(CTRTrainConfig(output=str(tmp_path / "a"), steps=8, **common))
    train_and_evaluate(CTRTrainConfig(output=str(tmp_path / "b"), steps=4, **common))
    resumed = train_and_evaluate(CTRTrainConfig(output=str(tmp_path / "b"), steps=8, resume=True, **common))
    assert resumed["steps"] == straight["steps"] == 8
    assert resumed["auc"] == pytest.approx(straight["auc"], abs=1e-6)
    assert resumed["logloss"] == pytest.approx(straight["logloss"], abs=1e-6)
    assert resumed["table_rows_used"] == straight["table_rows_used"]


def test_command_line_contract(ctr_shards, tmp_path):
    out = tmp_path / "model"
    code = cli.main(
        [
            "train", "ctr", "--data", str(ctr_shards), "--model", "wide_deep", "--output", str(out),
            "--batch-size", "256", "--epochs", "1", "--optimizer", "cowclip", "--embedding-dim", "8",
            "--min-count", "2", "--feature-selection", "gating", "--ensemble-size", "2",
            "--mesh", "batch=4,model=2", "--set", "hidden=32,16", "--set", "capacity=16384",
        ]
    )  # fmt: skip
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "auc",
        "logloss",
        "examples_per_sec",
        "steps",
        "table_rows_used",
        "ids_filtered",
        "ids_expired",
    ):
        assert key in m, key
    assert m["ids_filtered"] > 0  # min-count 2 keeps singletons out of the table
    s = json.loads((out / "selected_features.json").read_text())
    assert set(s["gate_probability"]) == set(INT_FIELDS + CAT_FIELDS) and s["selected"]
    assert (out / "saved_model" / "saved_model.pb").exists() and (out / "curves.png").exists()
    assert list((out / "tensorboard").rglob("events.*"))


def test_expiry_frees_rows_during_training(ctr_shards, tmp_path):
    m = train_and_evaluate(
        CTRTrainConfig(
            data=str(ctr_shards), output=str(tmp_path / "m"), model="fm", steps=30, expire_steps=5,
            expire_every=5, export=False, **SMALL,
        )
    )  # fmt: skip
    assert m["ids_expired"] > 0 and m["table_rows_used"] < m["ids_admitted"]


# -------------------------------------------------------------------------------------------------
# Quality on a planted model
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    log = generate(root / "log.tsv", 150_000, seed=21)
    out = root / "shards"
    run_pipeline(ctr.build_ctr_ingest, ctr.CtrIngestConfig(input=log.path, output=str(out), shards=4))
    ys, ps = [], []
    for b in ctr.dataset(str(out), "eval", 4096):
        b = {k: v.numpy() for k, v in b.items()}
        ys.append(b["label"])
        ps.append(planted_probability(raw_columns(b)))
    return out, auc(np.concatenate(ys), np.concatenate(ps))


PLANTED_COMMON = dict(
    batch_size=1024, min_count=2, capacity=1 << 17, hidden=(64, 32), export=False, log_every_seconds=60
)


def test_deepfm_approaches_the_planted_models_auc(planted, tmp_path):
    shards, bayes = planted
    m = train_and_evaluate(
        CTRTrainConfig(data=str(shards), output=str(tmp_path / "m"), epochs=2, **PLANTED_COMMON)
    )
    assert bayes - 0.02 < m["auc"] <= bayes + 0.005, (m["auc"], bayes)


def test_ensemble_gating_selects_the_informative_fields(planted, tmp_path):
    shards, _ = planted
    informative = set(INFORMATIVE_INT) | set(INFORMATIVE_CAT)
    quality = {}
    for method in ("gating", "ensemble_gating"):
        out = tmp_path / method
        train_and_evaluate(
            CTRTrainConfig(
                data=str(shards), output=str(out), epochs=1, feature_selection=method, **PLANTED_COMMON
            )
        )
        s = json.loads((out / "selected_features.json").read_text())
        selected = set(s["selected"])
        noise_kept = len(selected - informative) / (39 - len(informative))
        recall = len(selected & informative) / len(informative)
        quality[method] = (recall, -noise_kept, s["retrained"]["auc"])
        assert recall >= 0.8 and noise_kept <= 0.1, (method, sorted(selected))
    ens, single = quality["ensemble_gating"], quality["gating"]
    assert ens[:2] >= single[:2] and ens[2] >= single[2] - 0.002, quality
