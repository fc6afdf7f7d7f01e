"""ct-ingest on real scanner files (../shared/data/ct_real): JPEG 2000, blanked UIDs, a missing preamble,
a gap in a series, and TotalSegmentator label maps that do not follow NAME_label naming.

The references are independent of headrace: HU from a plain pydicom stack sorted along the slice
normal; labels sampled from nibabel's array through the inverse of the label's affine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from headrace.pipelines.ct import CtIngestConfig, build_ct_ingest, dataset
from headrace.runners.beam_runner import run_pipeline

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "ct_real"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} is absent (real CT files)")

LABELS = """image,label
totalseg_siemens_ct_dicom20,totalseg_siemens_ct_dicom20/example_seg_dicom.nii.gz
totalseg_nifti/example_ct_sm.nii.gz,totalseg_nifti/example_seg.nii.gz
"""


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct-real")
    (root / "labels.csv").write_text(LABELS)
    out = root / "out"
    config = CtIngestConfig(input=str(REAL), output=str(out), labels=str(root / "labels.csv"), previews=False)
    run_pipeline(build_ct_ingest, config)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    records = {r["id"].decode(): r for r in dataset(str(out)).as_numpy_iterator()}
    return out, manifest, records


def _entry(manifest, folder):
    (entry,) = [m for m in manifest if any(f"/{folder}/" in s for s in m["sources"])]
    return entry


def _pydicom_stack(folder: Path) -> np.ndarray:
    import pydicom

    slices = [pydicom.dcmread(p, force=True) for p in sorted(folder.iterdir()) if p.suffix != ".gz"]
    iop = np.array(slices[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    slices.sort(key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal)))
    hu = [
        ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        for ds in slices
    ]
    return np.stack(hu).astype(np.float32)


@pytest.mark.parametrize(
    "folder",
    ["totalseg_siemens_ct_dicom20", "dwv_siemens_cta2", "pydicom_dicomdirtests_ct/98892001_CT5N"],
)
def test_real_series_give_the_hu_of_a_plain_pydicom_stack(ingested, folder):
    _, manifest, records = ingested
    entry = _entry(manifest, folder)
    assert entry["status"] == "ok", entry["reason"]
    # Axial slices (ImageOrientationPatient 1,0,0,0,1,0): [D, H, W] is the stack along the normal.
    np.testing.assert_array_equal(records[entry["id"]]["volume"], _pydicom_stack(REAL / folder))


def test_a_series_with_blanked_uids_is_grouped_by_its_frame_of_reference(ingested):
    _, manifest, records = ingested
    entry = _entry(manifest, "totalseg_siemens_ct_dicom20")
    assert entry["id"].startswith("frame-1.3.12.2.1107.5.1.4.60064.30000022120807274275100000041-")
    assert len([s for s in entry["sources"] if "/CT." in s]) == 20  # none de-duplicated by the empty UID
    assert entry["shape"] == [20, 512, 512] and entry["spacing"] == [2.0, 0.976562, 0.976562]
    volume = records[entry["id"]]["volume"]
    assert (volume.min(), volume.max()) == (-1024.0, 1839.0)


def test_a_series_with_a_gap_is_rejected(ingested):
    _, manifest, _ = ingested
    entry = _entry(manifest, "pydicom_dicomdirtests_ct/77654033_CT2")
    assert entry["status"] == "rejected" and entry["kind"] == "varying_spacing"
    assert "202.500 mm" in entry["reason"]


def _label_by_affine(label_path: Path, world_lps: np.ndarray) -> np.ndarray:
    """The label value at each LPS point, read from nibabel's array by the inverse affine."""
    import nibabel as nib

    img = nib.load(label_path)
    ras = world_lps * np.array([-1.0, -1.0, 1.0])
    ijk = np.rint(np.linalg.inv(img.affine) @ np.c_[ras, np.ones(len(ras))].T)[:3].astype(int)
    return np.asarray(img.dataobj)[ijk[0], ijk[1], ijk[2]]


def test_the_totalsegmentator_label_map_lands_on_its_dicom_series(ingested):
    import pydicom

    _, manifest, records = ingested
    entry = _entry(manifest, "totalseg_siemens_ct_dicom20")
    assert entry["label"] and any(s.endswith("example_seg_dicom.nii.gz") for s in entry["sources"])
    label = records[entry["id"]]["label"]
    # The world position of every voxel of the [D, H, W] volume, from the DICOM headers alone.
    files = sorted((REAL / "totalseg_siemens_ct_dicom20").glob("CT.*"))
    heads = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True, force=True) for p in files),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    iop = np.array(heads[0].ImageOrientationPatient, dtype=float)
    dy, dx = (float(v) for v in heads[0].PixelSpacing)
    d, h, w = label.shape
    k, i, j = np.meshgrid(np.arange(d), np.arange(0, h, 7), np.arange(0, w, 7), indexing="ij")
    origin = np.array([heads[int(kk)].ImagePositionPatient for kk in k.ravel()], dtype=float)
    world = origin + np.outer(i.ravel() * dy, iop[3:]) + np.outer(j.ravel() * dx, iop[:3])
    expected = _label_by_affine(REAL / "totalseg_siemens_ct_dicom20" / "example_seg_dicom.nii.gz", world)
    got = label[k.ravel(), i.ravel(), j.ravel()]
    assert (expected > 0).mean() > 0.05  # the check is not vacuous
    np.testing.assert_array_equal(got, expected)


def test_the_totalsegmentator_nifti_pair_is_paired_by_the_labels_file(ingested):
    import nibabel as nib

    _, manifest, records = ingested
    entry = _entry(manifest, "totalseg_nifti")
    assert entry["status"] == "ok" and entry["label"] and entry["shape"] == [30, 101, 122]
    record = records[entry["id"]]
    image = nib.load(REAL / "totalseg_nifti" / "example_ct_sm.nii.gz")
    seg = np.asarray(nib.load(REAL / "totalseg_nifti" / "example_seg.nii.gz").dataobj)
    # RAS stored [x, y, z] -> [D=z, H=y reversed (posterior), W=x reversed (left)], as for DICOM.
    assert np.allclose(np.diag(image.affine)[:3], [3, 3, 3])
    np.testing.assert_array_equal(record["label"], seg.transpose(2, 1, 0)[:, ::-1, ::-1])
    np.testing.assert_array_equal(
        record["volume"], np.asarray(image.dataobj).transpose(2, 1, 0)[:, ::-1, ::-1]
    )
    assert len(np.unique(record["label"])) == 42  # 41 labels and background
