"""ct-ingest with malformed DICOM headers, short pixel data and broken NIfTI: each is rejected naming the
attribute, the other volumes are written, and no bad volume is written as if valid."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from headrace.pipelines import ct_data
from headrace.pipelines.ct import CtIngestConfig, build_ct_ingest, dataset
from headrace.runners.beam_runner import run_pipeline
from headrace.transforms.dicom import read_header
from headrace.transforms.nifti import read_nifti
from headrace.transforms.volume import GeometryError

from ..fuzz.corpus import edit_dicom, write_series

MALFORMED = [
    ("ImagePositionPatient", [1.0, 2.0], "ImagePositionPatient (0020,0032) has 2 value(s)"),
    ("ImagePositionPatient", None, "missing ImagePositionPatient"),
    (
        "ImageOrientationPatient",
        [1.0, 0.0, 0.0, 0.0, 1.0],
        "ImageOrientationPatient (0020,0037) has 5 value(s)",
    ),
    ("ImageOrientationPatient", [1.0, 0.0, 0.0, 1.0, 0.0, 0.0], "is not two orthogonal unit vectors"),
    ("PixelSpacing", [0.7], "PixelSpacing (0028,0030) has 1 value(s)"),
    ("PixelSpacing", [0.0, 0.7], "must be > 0"),
    ("PixelSpacing", None, "missing PixelSpacing"),
    ("RescaleSlope", "abc", "RescaleSlope (0028,1053) is not numeric"),
    ("RescaleSlope", "0", "RescaleSlope (0028,1053) is 0"),
    ("RescaleIntercept", "nan", "RescaleIntercept (0028,1052) is not finite"),
    ("Rows", 0, "Rows (0028,0010) is 0.0, expected 1..65535"),
    ("Columns", None, "missing Columns"),
    ("BitsAllocated", 12, "BitsAllocated (0028,0100) is 12, expected 8 or 16 or 32"),
    ("BitsStored", 20, "BitsStored (0028,0101) is 20 with BitsAllocated 16"),
    ("SamplesPerPixel", 3, "SamplesPerPixel (0028,0002) is 3, expected 1"),
]


@pytest.mark.parametrize("keyword,value,message", MALFORMED, ids=[f"{k}-{v}" for k, v, _ in MALFORMED])
def test_each_malformed_header_attribute_is_named(tmp_path, keyword, value, message):
    path = write_series(tmp_path)[0]
    edit_dicom(path, keyword, value)
    with pytest.raises(GeometryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_header(path)


def _break_pixdim(path: str, axis: int, value: float) -> None:
    data = bytearray(Path(path).read_bytes())
    struct.pack_into("<f", data, 76 + 4 * (axis + 1), value)  # pixdim[axis + 1]
    struct.pack_into("<hh", data, 252, 0, 0)  # qform_code, sform_code: the affine comes from pixdim
    Path(path).write_bytes(bytes(data))


def test_broken_nifti_is_rejected_with_a_reason(tmp_path):
    volume = ct_data.phantom((4, 6, 5), seed=1).hu
    nan = volume.copy()
    nan[1, 2, 3] = np.nan
    ct_data.write_nifti(tmp_path / "nan.nii", nan, dtype=np.float32)
    inf = volume.copy()
    inf[0, 0, 0] = np.inf
    ct_data.write_nifti(tmp_path / "inf.nii.gz", inf, dtype=np.float32)
    for name, axis, value in (("zero.nii", 1, 0.0), ("negative.nii", 0, -2.0)):
        ct_data.write_nifti(tmp_path / name, volume)
        _break_pixdim(str(tmp_path / name), axis, value)
    with pytest.raises(
        GeometryError, match=r"1 voxel\(s\) are NaN or infinite \(the first at \[D, H, W\] \[1, 2, 3\]"
    ):
        read_nifti(str(tmp_path / "nan.nii"), None)
    with pytest.raises(GeometryError, match="NaN or infinite"):
        read_nifti(str(tmp_path / "inf.nii.gz"), None)
    with pytest.raises(GeometryError, match=r"voxel size \(pixdim\) \[.*0\.0.*\] must be positive"):
        read_nifti(str(tmp_path / "zero.nii"), None)
    with pytest.raises(GeometryError, match=r"voxel size \(pixdim\) \[-2\.0.*\] must be positive"):
        read_nifti(str(tmp_path / "negative.nii"), None)


def test_one_bad_file_rejects_its_series_only_and_nothing_bad_is_written(tmp_path):
    root = tmp_path / "in"
    good = write_series(root / "good", seed=1)
    bad_position = write_series(root / "bad_position", seed=2)
    edit_dicom(bad_position[1], "ImagePositionPatient", [1.0, 2.0])
    short = write_series(root / "short_pixels", seed=3)
    import pydicom

    ds = pydicom.dcmread(short[2])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(short[2], enforce_file_format=True)
    volume = ct_data.phantom((4, 6, 5), seed=4).hu
    ct_data.write_nifti(root / "image.nii.gz", volume)
    ct_data.write_nifti(
        root / "image_label.nii.gz", (volume > 0).astype(np.uint8)[:, :, :4], spacing=(2.5, 0.75, 0.75)
    )
    nan = volume.astype(np.float32)
    nan[0, 0, 0] = np.nan
    ct_data.write_nifti(root / "nan.nii", nan, dtype=np.float32)
    out = tmp_path / "out"
    run_pipeline(build_ct_ingest, CtIngestConfig(input=str(root), output=str(out), previews=False))
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_status = {}
    for m in manifest:
        by_status.setdefault(m["status"], []).append(m)
    (ok,) = by_status["ok"]
    assert sorted(ok["sources"]) == sorted(good)
    reasons = {
        Path(m["sources"][0]).parent.name if "/in/" in m["sources"][0] else "": m
        for m in by_status["rejected"]
    }
    rejected = {
        tuple(sorted(Path(s).name for s in m["sources"])): (m["kind"], m["reason"])
        for m in by_status["rejected"]
    }
    assert any("ImagePositionPatient (0020,0032) has 2 value(s)" in r for _, r in rejected.values())
    assert any(k == "bad_pixels" and Path(short[2]).name in r for k, r in rejected.values())
    assert rejected[("image.nii.gz", "image_label.nii.gz")][0] == "label_mismatch"
    assert rejected[("nan.nii",)][0] == "bad_voxels"
    assert reasons  # every rejection is a manifest line with its files
    report = json.loads((out / "report.json").read_text())
    assert report["files"] == report["files_in_volumes"] + report["files_rejected"] == 4 * 3 + 3
    assert [r["id"].decode() for r in dataset(str(out)).as_numpy_iterator()] == [ok["id"]]
