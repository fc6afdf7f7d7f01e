"""export ctr|unet3d: the float32 TFLite models compute what the SavedModels compute, the int8 ones stay
close (AUC, probabilities), the ops left float are reported, and bad models are clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from headrace.core.errors import InputError
from headrace.models.criteo import FIELDS
from headrace.models.metrics import auc
from headrace.models.quantize import RowLookup, TFLiteModel
from headrace.pipelines import ct_data
from headrace.pipelines.ct import CtIngestConfig, build_ct_ingest, volume_dataset
from headrace.runners import cli, export
from headrace.runners.beam_runner import run_pipeline
from headrace.runners.retrain import _split_columns
from headrace.runners.train_ctr import CTRTrainConfig, train_and_evaluate


@pytest.fixture(scope="module")
def ctr_model(ctr_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export-ctr") / "model"
    config = CTRTrainConfig(
        data=str(ctr_shards),
        output=str(out),
        steps=40,
        batch_size=256,
        hidden=(32, 16),
        mesh="",
        log_every_seconds=60,
    )
    train_and_evaluate(config)
    assert cli.main(["export", "ctr", "--model", str(out), "--int8", "--samples", "512"]) == 0
    return out


def test_ctr_float_tflite_equals_the_saved_model_and_int8_keeps_the_auc(ctr_model, ctr_shards):
    columns, labels = _split_columns(str(ctr_shards), "eval")
    serve = tf.saved_model.load(str(ctr_model / "saved_model")).signatures["serving_default"]
    reference = serve(**{k: tf.constant(columns[k]) for k in FIELDS})["probability"].numpy()
    float_lite = export.CTRLite(ctr_model / "tflite", "float32").probability(columns)
    np.testing.assert_allclose(float_lite, reference, rtol=1e-4, atol=1e-6)
    int8 = export.CTRLite(ctr_model / "tflite", "int8").probability(columns)
    assert np.abs(int8 - reference).max() < 0.05
    assert abs(auc(labels, int8) - auc(labels, reference)) < 0.01
    summary = json.loads((ctr_model / "tflite" / "export.json").read_text())
    ops = summary["files"]["int8.tflite"]
    assert ops["int8_ops"]["FULLY_CONNECTED"] >= 2 and "GATHER" in ops["int8_ops"]  # the MLP and the rows
    assert summary["files"]["int8.tflite"]["bytes"] < summary["files"]["float32.tflite"]["bytes"] / 2


def test_row_lookup_is_the_serving_table():
    lookup = RowLookup(np.array([40, -7, 12], np.int64))  # rows 1, 2, 3 in the table's order
    got = lookup(np.array([[12, 40, 5], [-7, 0, 41]], np.int64))
    assert got.tolist() == [[3, 1, 0], [2, 0, 0]]
    assert RowLookup(np.array([], np.int64))(np.array([[1]])).tolist() == [[0]]


def test_a_model_without_keys_or_without_a_saved_model_is_a_clear_error(ctr_model, tmp_path):
    with pytest.raises(InputError, match=r"no resolved_config\.json"):
        export.export_ctr(str(tmp_path))
    broken = tmp_path / "m"
    broken.mkdir()
    shutil.copy(ctr_model / "resolved_config.json", broken)
    with pytest.raises(InputError, match="no saved_model"):
        export.export_ctr(str(broken))
    assert not (broken / "tflite").exists()


@pytest.fixture(scope="module")
def unet_model(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export-unet")
    for k in range(3):
        ph = ct_data.phantom((32, 48, 48), seed=k, lesion_radius=0.3)
        ct_data.write_nifti(root / "in" / f"case{k}.nii.gz", ph.hu)
        ct_data.write_nifti(root / "in" / f"case{k}_label.nii.gz", ph.label, dtype=np.uint8)
    run_pipeline(build_ct_ingest, CtIngestConfig(input=str(root / "in"), output=str(root / "ct")))
    argv = ["train", "unet3d", "--data", str(root / "ct"), "--output", str(root / "m"), "--steps", "8"]
    assert cli.main([*argv, "--patch", "16,32,32", "--channels", "4", "--depth", "2"]) == 0
    assert cli.main(["export", "unet3d", "--model", str(root / "m"), "--int8", "--samples", "6"]) == 0
    return root / "m", root / "ct"


def test_unet_float_tflite_equals_the_saved_model_and_int8_reports_its_float_ops(unet_model):
    model, ct = unet_model
    serve = tf.saved_model.load(str(model / "saved_model")).signatures["serving_default"]
    volume = next(iter(volume_dataset(str(ct))))["volume"].numpy()
    window = volume[None, :16, :32, :32, None].astype(np.float32)
    reference = serve(volume=tf.constant(window))["probability"].numpy()
    lite = {k: TFLiteModel((model / "tflite" / f"{k}.tflite").read_bytes()) for k in ("float32", "int8")}
    np.testing.assert_allclose(lite["float32"](window)[0], reference, rtol=1e-4, atol=1e-5)
    assert np.abs(lite["int8"](window)[0] - reference).mean() < 0.1
    two = np.concatenate([window, window[:, ::-1]])
    np.testing.assert_allclose(
        lite["float32"](two)[0][0], reference[0], rtol=1e-4, atol=1e-5
    )  # resized batch
    float_ops = json.loads((model / "tflite" / "export.json").read_text())["files"]["int8.tflite"][
        "float_ops"
    ]
    assert "CONV_3D" in float_ops  # TFLite has no int8 3D convolution: the export says so
