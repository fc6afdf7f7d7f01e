"""`headrace train unet3d` / `predict unet3d` on ct-ingest output: the contract commands, partitioned."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nibabel")

from headrace.pipelines import ct_data
from headrace.pipelines.ct import CtIngestConfig, build_ct_ingest, volume_dataset
from headrace.runners import cli
from headrace.runners.beam_runner import run_pipeline

TRAIN = ["--steps", "6", "--patch", "16,32,32", "--channels", "4", "--depth", "3", "--seed", "1"]


@pytest.fixture(scope="module")
def ct_out(tmp_path_factory) -> Path:
    """Five phantoms (32 x 48 x 48) as NIfTI, four with a lesion label, through ct-ingest."""
    root = tmp_path_factory.mktemp("unet")
    for k in range(5):
        ph = ct_data.phantom((32, 48, 48), seed=k, lesion_radius=0.3)
        ct_data.write_nifti(root / "in" / f"case{k}.nii.gz", ph.hu)
        if k < 4:
            ct_data.write_nifti(root / "in" / f"case{k}_label.nii.gz", ph.label, dtype=np.uint8)
    out = root / "ct"
    run_pipeline(build_ct_ingest, CtIngestConfig(input=str(root / "in"), output=str(out)))
    return out


@pytest.fixture(scope="module")
def trained(ct_out, tmp_path_factory) -> dict[int, Path]:
    models = {}
    for parts in (1, 4):
        m = tmp_path_factory.mktemp("unet-model") / f"p{parts}"
        argv = ["train", "unet3d", "--data", str(ct_out), "--output", str(m), "--partitions", str(parts)]
        assert cli.main(argv + TRAIN) == 0
        models[parts] = m
    return models


def _metrics(m: Path) -> dict:
    return json.loads((m / "metrics.json").read_text())


def test_partitions_1_and_4_give_the_same_loss_history(trained):
    one, four = _metrics(trained[1]), _metrics(trained[4])
    assert len(one["loss_history"]) == 6
    np.testing.assert_allclose(four["loss_history"], one["loss_history"], rtol=1e-4)
    assert four["block_depths"] == [4, 4, 4, 4] and len(set(four["devices"])) == 4
    assert one["unlabelled_skipped"] == 1 and one["train_volumes"] + one["held_out_volumes"] == 4
    assert 0.0 <= one["dice"] <= 1.0 and one["voxels_per_sec"] > 0
    # Each of 4 devices holds a quarter of the activations plus halos.
    assert 0.2 < four["peak_bytes_per_device"] / one["peak_bytes_per_device"] < 0.45
    for m in trained.values():
        assert (m / "saved_model" / "saved_model.pb").exists()
        assert (m / "curves.png").exists() and (m / "predictions.png").exists()
        assert list((m / "tensorboard").iterdir())


def test_predict_writes_masks_previews_and_dice(ct_out, trained, tmp_path):
    pred = tmp_path / "pred"
    argv = ["predict", "unet3d", "--model", str(trained[4]), "--input", str(ct_out), "--output", str(pred)]
    assert cli.main(argv) == 0
    report = json.loads((pred / "report.json").read_text())
    assert report["volumes"] == 5 and 0.0 <= report["mean_dice"] <= 1.0
    masks = {v["id"].numpy().decode(): v for v in volume_dataset(str(pred))}
    assert set(masks) == {f"case{k}" for k in range(5)}
    for v in masks.values():
        prob, mask = v["volume"].numpy(), v["label"].numpy()
        assert prob.shape == (32, 48, 48) and ((prob > 0.5) == (mask == 1)).all()
    assert len(list((pred / "previews").glob("*.png"))) == 5


def test_memory_budget_refuses_whole_volume_and_partitioned_one_trains(ct_out, trained, tmp_path):
    one = _metrics(trained[1])["peak_bytes_per_device"]
    budget = str(0.5 * one / 2**20)  # half of what one device needs unpartitioned
    base = ["train", "unet3d", "--data", str(ct_out), "--memory-budget-mb", budget, *TRAIN]
    assert cli.main([*base, "--output", str(tmp_path / "p1"), "--partitions", "1"]) == 2
    assert not (tmp_path / "p1" / "metrics.json").exists()
    assert cli.main([*base, "--output", str(tmp_path / "p4"), "--partitions", "4"]) == 0


def test_shapes_that_cannot_be_partitioned_fail_clearly(ct_out, tmp_path, capsys):
    base = ["train", "unet3d", "--data", str(ct_out), "--output", str(tmp_path / "m"), "--steps", "1"]
    assert cli.main([*base, "--patch", "15,32,32"]) == 2
    assert "multiples of 4" in capsys.readouterr().err
    assert cli.main([*base, "--patch", "8,32,32", "--partitions", "4"]) == 2
    assert "needs a depth of at least 16" in capsys.readouterr().err


def test_whole_volumes_train_partitioned(ct_out, tmp_path):
    """--patch none: whole volumes, padded to a multiple of 2^(L-1), two blocks."""
    m = tmp_path / "whole"
    argv = [
        "train",
        "unet3d",
        "--data",
        str(ct_out),
        "--output",
        str(m),
        "--partitions",
        "2",
        "--patch",
        "none",
    ]
    assert cli.main([*argv, "--steps", "2", "--channels", "4"]) == 0
    metrics = _metrics(m)
    assert metrics["patch"] == [32, 48, 48] and metrics["block_depths"] == [16, 16]
    assert len(metrics["loss_history"]) == 2 and np.isfinite(metrics["loss_history"]).all()


def test_one_labelled_volume_trains_and_says_there_is_no_held_out_dice(tmp_path, capsys):
    ph = ct_data.phantom((16, 32, 32), seed=9, lesion_radius=0.3)
    ct_data.write_nifti(tmp_path / "in" / "only.nii.gz", ph.hu)
    ct_data.write_nifti(tmp_path / "in" / "only_label.nii.gz", ph.label, dtype=np.uint8)
    run_pipeline(build_ct_ingest, CtIngestConfig(input=str(tmp_path / "in"), output=str(tmp_path / "ct")))
    argv = [
        "train",
        "unet3d",
        "--data",
        str(tmp_path / "ct"),
        "--output",
        str(tmp_path / "m"),
        "--partitions",
        "1",
    ]
    assert cli.main([*argv, "--steps", "3", "--patch", "16,32,32", "--channels", "2", "--depth", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("no held-out Dice can be computed") == 1
    m = _metrics(tmp_path / "m")
    assert m["train_volumes"] == 1 and m["eval_on_train_volumes"] and m["dice"] is None
    assert 0 <= m["train_dice"] <= 1
