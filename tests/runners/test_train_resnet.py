"""train resnet on image-ingest shards of scikit-learn's digits, on the 8-device CPU mesh."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from headrace.pipelines.images import IMAGE_SPEC, ImageIngestConfig, build_image_ingest
from headrace.pipelines.images_data import write_digits
from headrace.runners import cli
from headrace.runners.beam_runner import run_pipeline
from headrace.transforms.tfrecord import read_examples

FAST = ["--depth", "18", "--width", "8", "--image-size", "16", "--batch-size", "32", "--steps", "12"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    assert write_digits(root / "in") == 1797
    out = root / "out"
    run_pipeline(
        build_image_ingest, ImageIngestConfig(input=str(root / "in"), output=str(out), eval_fraction=0.1)
    )
    return out


def test_resnet_trains_with_grouped_batch_norm_and_serves_jpeg_bytes(digits, tmp_path):
    out = tmp_path / "m"
    argv = ["train", "resnet", "--config", "resnet-digits", "--data", str(digits), "--output", str(out)]
    assert cli.main([*argv, *FAST, "--mesh", "batch=8", "--bn-group-size", "2", "--optimizer", "lars"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 12 and m["devices"] == 8 and m["bn_groups"] == 4 and m["depth"] == 18
    assert np.isfinite(m["loss_last"])  # 12 warm-up steps may not lower it; the slow test checks learning
    assert m["eval_images"] == json.loads((digits / "report.json").read_text())["eval"]
    assert 0 <= m["top1"] <= m["top5"] <= 1
    assert (
        m["images_per_sec"] > 0
        and m["compute_seconds_per_step"] > 0
        and m["input_wait_seconds_per_step"] >= 0
    )
    for name in ("curves.png", "augmented.png", "classes.json", "resolved_config.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.*"))
    # The SavedModel takes the records' JPEG bytes and agrees with the trainer's own evaluation.
    served = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    records = list(read_examples(str(digits / "eval-*.tfrecord"), IMAGE_SPEC))
    result = served(jpeg=tf.constant([r["image"].item() for r in records]))
    np.testing.assert_allclose(result["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)
    labels = np.array([int(r["label"]) for r in records])
    assert np.mean(result["class_id"].numpy() == labels) == pytest.approx(m["top1"], abs=1e-9)
    classes = json.loads((out / "classes.json").read_text())["classes"]
    assert [c.decode() for c in result["class_name"].numpy()[:5]] == [
        classes[i] for i in result["class_id"][:5]
    ]


def test_a_group_size_that_does_not_divide_the_replicas_is_refused(digits, tmp_path, capsys):
    argv = [
        "train",
        "resnet",
        "--config",
        "resnet-digits",
        "--data",
        str(digits),
        "--output",
        str(tmp_path / "m"),
    ]
    assert cli.main([*argv, *FAST, "--mesh", "batch=8", "--bn-group-size", "3"]) == 2
    assert "--bn-group-size 3 does not divide the 8 replicas" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_model_parallel_mesh_is_refused(digits, tmp_path, capsys):
    argv = ["train", "resnet", "--data", str(digits), "--output", str(tmp_path / "m"), *FAST]
    assert cli.main([*argv, "--mesh", "batch=4,model=2"]) == 2
    assert "ResNet is data parallel" in capsys.readouterr().err


@pytest.mark.slow
def test_resnet18_reaches_95_percent_on_the_digits(digits, tmp_path):
    """The digits config (ResNet-18, width 32, 12 epochs at 32 pixels): about 5 minutes on 2 cores."""
    out = tmp_path / "m"
    argv = ["train", "resnet", "--config", "resnet-digits", "--data", str(digits), "--output", str(out)]
    assert cli.main([*argv, "--mesh", "batch=8", "--no-export"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["top1"] >= 0.95, m["top1"]
