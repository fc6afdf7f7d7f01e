"""ct-ingest on real DICOM and NIfTI files (pydicom's and nibabel's own test data) and on series written here.

The HU volumes must equal independently computed arrays exactly; the corrupt file and the bad series are
rejected with reasons naming the files; every input file is in exactly one manifest line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from headrace.pipelines import ct_data  # noqa: E402
from headrace.pipelines.ct import (  # noqa: E402
    BLOCK_SPEC,
    VOLUME_SPEC,
    CtIngestConfig,
    build_ct_ingest,
    patch_dataset,
    volume_dataset,
)
from headrace.runners import cli  # noqa: E402
from headrace.runners.beam_runner import run_pipeline  # noqa: E402
from headrace.transforms.tfrecord import read_examples  # noqa: E402
from headrace.transforms.volume import resample  # noqa: E402

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_FILES = Path(nib.__file__).parent / "tests" / "data"

SLOPE, INTERCEPT = 0.5, -1024.0


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """An input folder: written series (good, duplicated slice, varying gaps, mixed sizes), a corrupt file,
    a NIfTI image with its label, and real files from pydicom and nibabel."""
    root = tmp_path_factory.mktemp("ct-in") / "in"
    ph = ct_data.phantom((20, 36, 30), seed=3)
    good_uid, good_files = ct_data.write_dicom_series(
        root / "patient1" / "a", ph.hu, slope=SLOPE, intercept=INTERCEPT, seed=3
    )
    small = ct_data.phantom((6, 16, 16), seed=4).hu
    dup_uid, dup_files = ct_data.write_dicom_series(
        root / "patient2", small, seed=4, positions=[0.0, 2.0, 4.0, 4.0, 6.0, 8.0]
    )
    gap_uid, _ = ct_data.write_dicom_series(root / "gaps", small, seed=5, positions=[0, 2, 4, 6, 9, 11])
    mixed_uid, _ = ct_data.write_dicom_series(root / "mixed", small[:3], seed=6)
    ct_data.write_dicom_series(
        root / "mixed", ct_data.phantom((1, 20, 16), seed=7).hu, series_uid=mixed_uid, seed=7, positions=[7.5]
    )
    sagittal = ct_data.phantom((10, 24, 20), seed=9).hu  # [slices, rows, columns] as acquired
    sag_uid, _ = ct_data.write_dicom_series(
        root / "sagittal", sagittal, spacing=(1.5, 0.8, 0.6), seed=9, orientation=(0, 1, 0, 0, 0, -1)
    )
    corrupt = root / "patient1" / "a" / "IM_CORRUPT"
    corrupt.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00garbage" * 20)
    trunc_uid, trunc_files = ct_data.write_dicom_series(root / "trunc", small[:4], seed=8)
    data = Path(trunc_files[2]).read_bytes()
    Path(trunc_files[2]).write_bytes(data[: len(data) - 300])  # pixel data cut short
    ct_data.write_nifti(root / "nifti" / "liver.nii.gz", ph.hu)
    ct_data.write_nifti(root / "nifti" / "liver_label.nii.gz", ph.label, dtype=np.uint8)
    ct_data.write_nifti(root / "nifti" / "orphan_label.nii.gz", ph.label, dtype=np.uint8)
    real = root / "real"
    shutil.copytree(PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N", real / "CT5N")
    shutil.copytree(PYDICOM_FILES / "dicomdirtests" / "77654033" / "CT2", real / "CT2")
    for name in ("CT_small.dcm", "rtplan.dcm"):
        shutil.copy(PYDICOM_FILES / name, real / name)
    for name in ("anatomical.nii", "example4d.nii.gz"):
        shutil.copy(NIBABEL_FILES / name, real / name)
    return {
        "root": root,
        "phantom": ph,
        "good": good_uid,
        "good_files": good_files,
        "dup": dup_uid,
        "dup_files": dup_files,
        "gaps": gap_uid,
        "mixed": mixed_uid,
        "corrupt": str(corrupt),
        "sagittal": sag_uid,
        "sagittal_hu": sagittal,
        "trunc": trunc_uid,
        "trunc_file": trunc_files[2],
    }


@pytest.fixture(scope="module")
def ingested(study, tmp_path_factory) -> Path:
    """The contract command, through the CLI (blocks forced for volumes over 0.05 MB)."""
    out = tmp_path_factory.mktemp("ct-out") / "out"
    argv = ["run", "ct-ingest", "--input", str(study["root"]), "--output", str(out), "--shards", "3"]
    argv += ["--block-above-mb", "0.05", "--block", "8,16,16", "--halo", "3"]
    assert cli.main(argv) == 0
    return out


def _manifest(out: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return {line["id"]: line for line in lines}


def _volumes(out: Path) -> dict[str, dict]:
    volumes = {}
    for ex in read_examples(str(out / "volumes-*.tfrecord"), VOLUME_SPEC, decode_arrays=False):
        shape = tuple(ex["shape"])
        label = ex["label"].item()
        volumes[ex["id"].item().decode()] = {
            "volume": np.frombuffer(ex["volume"].item(), "<f4").reshape(shape),
            "label": np.frombuffer(label, np.uint8).reshape(shape) if label else None,
            "spacing": ex["spacing"],
        }
    return volumes


def _all_files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if p.is_file()}


def test_every_input_file_is_in_exactly_one_manifest_line(study, ingested):
    manifest = _manifest(ingested)
    sources = [s for line in manifest.values() for s in line["sources"]]
    assert sorted(sources) == sorted(_all_files(study["root"]))
    report = json.loads((ingested / "report.json").read_text())
    assert report["files"] == len(sources) == report["files_in_volumes"] + report["files_rejected"]
    assert report["volumes"] == sum(line["status"] == "ok" for line in manifest.values()) == 6
    assert report["rejected"] == len(manifest) - 6
    assert (ingested / "resolved_config.json").exists()
    assert sorted(p.name for p in ingested.glob("volumes-*")) == [
        f"volumes-0000{i}-of-00003.tfrecord" for i in range(3)
    ]
    assert not (ingested / ".work").exists()


def test_written_series_is_exact_hu_in_slice_order(study, ingested):
    volumes = _volumes(ingested)
    got = volumes[study["good"]]
    want = ct_data.expected_hu(study["phantom"].hu, SLOPE, INTERCEPT)
    assert got["volume"].dtype == np.float32
    np.testing.assert_array_equal(got["volume"], want)
    np.testing.assert_allclose(got["spacing"], [2.5, 0.75, 0.75], rtol=1e-6)
    # The stored values really are scaled: the volume differs from the raw stored integers.
    assert not np.array_equal(got["volume"], ct_data.stored_values(study["phantom"].hu, SLOPE, INTERCEPT))


def test_bad_inputs_are_rejected_with_reasons_naming_the_files(study, ingested):
    manifest = _manifest(ingested)
    corrupt = next(line for line in manifest.values() if line["sources"] == [study["corrupt"]])
    assert corrupt["status"] == "rejected" and study["corrupt"] in corrupt["reason"]
    assert corrupt["kind"] in ("not_dicom", "unreadable", "missing_attribute")
    trunc = manifest[study["trunc"]]  # a slice whose pixel data is cut short: its series is incomplete
    assert trunc["kind"] == "bad_pixels" and study["trunc_file"] in trunc["reason"]

    dup = manifest[study["dup"]]
    assert dup["status"] == "rejected" and dup["kind"] == "duplicate_slice"
    assert "duplicate slice position 39.000 mm"  # origin z 35 + 4 in dup["reason"]
    assert sum(f in dup["reason"] for f in dup["sources"]) == 2  # both files named
    assert len(dup["sources"]) == 6

    assert manifest[study["gaps"]]["kind"] == "varying_spacing"
    assert manifest[study["mixed"]]["kind"] == "mixed_sizes"
    assert manifest["orphan"]["kind"] == "unpaired_label"
    assert manifest["example4d"]["kind"] == "not_3d"
    rtplan = next(line for line in manifest.values() if line["sources"][0].endswith("rtplan.dcm"))
    assert rtplan["kind"] == "missing_attribute" and "Rows (0028,0010)" in rtplan["reason"]
    # pydicom's own CT2 series: positions -99.48, 103.02, 104.27, 105.52 mm; not one grid.
    ct2 = next(line for line in manifest.values() if line["sources"][0].split("/")[-2] == "CT2")
    assert ct2["kind"] == "varying_spacing"
    report = json.loads((ingested / "report.json").read_text())
    assert report["rejected_reasons"]["varying_spacing"] == 2


def test_sagittal_series_is_brought_to_the_axial_axes(study, ingested):
    """Rows run along (0, 0, -1) (inferior), columns along (0, 1, 0) (posterior), the normal along
    (-1, 0, 0) (toward the patient's right): D is the rows reversed, H the columns, W the slices reversed."""
    got = _volumes(ingested)[study["sagittal"]]
    want = study["sagittal_hu"].transpose(1, 2, 0)[::-1, :, ::-1]
    np.testing.assert_array_equal(got["volume"], ct_data.expected_hu(want, 1.0, -1024.0))
    np.testing.assert_allclose(got["spacing"], [0.8, 0.6, 1.5], rtol=1e-6)


def test_real_pydicom_series_equals_slices_sorted_by_position(study, ingested):
    files = sorted((study["root"] / "real" / "CT5N").iterdir())
    slices = [pydicom.dcmread(f) for f in files]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))  # axial: the normal is +z
    want = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices]
    ).astype(np.float32)
    got = _volumes(ingested)[str(slices[0].SeriesInstanceUID)]
    np.testing.assert_array_equal(got["volume"], want)
    np.testing.assert_allclose(got["spacing"], [2.5, 0.488281, 0.488281], rtol=1e-5)
    single = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    got = _volumes(ingested)[str(single.SeriesInstanceUID)]
    np.testing.assert_array_equal(got["volume"][0], single.pixel_array.astype(np.float32) - 1024.0)
    assert got["spacing"][0] == pytest.approx(float(single.SliceThickness))


def test_nifti_follows_the_same_axes_as_dicom(study, ingested):
    volumes = _volumes(ingested)
    liver = volumes["liver"]  # written from the phantom's [D, H, W] array by ct_data.write_nifti
    np.testing.assert_array_equal(liver["volume"], study["phantom"].hu)
    np.testing.assert_array_equal(liver["label"], study["phantom"].label)
    # nibabel's own file, checked against nibabel's reorientation (RAS+), flipped to our R->L, A->P.
    img = nib.as_closest_canonical(nib.load(NIBABEL_FILES / "anatomical.nii"))
    want = img.get_fdata().transpose(2, 1, 0)[:, ::-1, ::-1]
    np.testing.assert_array_equal(volumes["anatomical"]["volume"], want.astype(np.float32))
    np.testing.assert_allclose(volumes["anatomical"]["spacing"], img.header.get_zooms()[::-1], rtol=1e-6)


def test_blocks_tile_the_volume_with_halos(study, ingested):
    volumes = _volumes(ingested)
    blocks: dict[str, list] = {}
    for ex in read_examples(str(ingested / "blocks-*.tfrecord"), BLOCK_SPEC, decode_arrays=False):
        blocks.setdefault(ex["id"].item().decode(), []).append(ex)
    assert set(blocks) == {k for k, m in _manifest(ingested).items() if m.get("blocks")}
    for id_, parts in blocks.items():
        volume = volumes[id_]["volume"]
        rebuilt = np.full(volume.shape, np.nan, np.float32)
        for ex in parts:
            shape, start = tuple(ex["shape"]), ex["start"]
            block = np.frombuffer(ex["volume"].item(), "<f4").reshape(shape)
            region = tuple(slice(a, a + n) for a, n in zip(start, shape))
            np.testing.assert_array_equal(block, volume[region])  # the halo is the true neighbourhood
            core = tuple(slice(a, b) for a, b in zip(ex["core_start"], ex["core_stop"]))
            target = tuple(slice(a + c.start, a + c.stop) for a, c in zip(start, core))
            assert np.isnan(rebuilt[target]).all()  # cores do not overlap
            rebuilt[target] = block[core]
        np.testing.assert_array_equal(rebuilt, volume)
    assert len(blocks["liver"]) == 3 * 3 * 2  # ceil(20/8) x ceil(36/16) x ceil(30/16)


def test_previews_are_written_for_every_volume(ingested):
    for id_, line in _manifest(ingested).items():
        png = ingested / "previews" / f"{id_}.png"
        assert png.exists() == (line["status"] == "ok")
        if png.exists():
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resampled_and_windowed_ingest_matches_scipy(study, tmp_path):
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    src = tmp_path / "in"
    shutil.copytree(study["root"] / "nifti", src)
    (src / "orphan_label.nii.gz").unlink()
    out = tmp_path / "out"
    config = CtIngestConfig(
        input=str(src), output=str(out), spacing=(3.0, 1.1, 0.6), hu_window=(-100.0, 200.0)
    )
    run_pipeline(build_ct_ingest, config)
    got = _volumes(out)["liver"]
    hu, label = study["phantom"].hu, study["phantom"].label
    old, new = (2.5, 0.75, 0.75), (3.0, 1.1, 0.6)
    shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(hu.shape, old, new))
    grid = np.meshgrid(*[np.arange(m) * (t / s) for m, s, t in zip(shape, old, new)], indexing="ij")
    want = scipy_ndimage.map_coordinates(hu.astype(np.float64), grid, order=1, mode="nearest")
    np.testing.assert_allclose(got["volume"], np.clip(want, -100, 200), atol=1e-4, rtol=0)
    want_label = scipy_ndimage.map_coordinates(label, grid, order=0, mode="nearest")
    np.testing.assert_array_equal(got["label"], want_label)
    np.testing.assert_allclose(got["spacing"], new, rtol=1e-6)


@pytest.mark.parametrize(
    "old,new",
    [
        ((2.5, 0.75, 0.75), (1.0, 1.0, 1.0)),
        ((1.0, 1.0, 1.0), (0.4, 2.3, 1.0)),
        ((3.0, 0.5, 0.7), (3.0, 0.5, 0.7)),
    ],
)
def test_resample_equals_scipy_map_coordinates(old, new):
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    volume = rng.uniform(-1000, 1000, size=(9, 14, 11)).astype(np.float32)
    shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(volume.shape, old, new))
    grid = np.meshgrid(*[np.arange(m) * (t / s) for m, s, t in zip(shape, old, new)], indexing="ij")
    want = scipy_ndimage.map_coordinates(volume.astype(np.float64), grid, order=1, mode="nearest")
    got = resample(volume, old, new, order=1)
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    labels = rng.integers(0, 4, size=volume.shape).astype(np.uint8)
    np.testing.assert_array_equal(
        resample(labels, old, new, order=0),
        scipy_ndimage.map_coordinates(labels, grid, order=0, mode="nearest"),
    )


def test_tf_data_reader_yields_volumes_and_balanced_patches(study, ingested):
    volumes = {v["id"].numpy().decode(): v for v in volume_dataset(str(ingested))}
    assert len(volumes) == 6
    liver = volumes["liver"]
    np.testing.assert_array_equal(liver["volume"].numpy(), study["phantom"].hu)
    assert bool(liver["has_label"]) and not bool(volumes[study["good"]]["has_label"])

    patches = list(
        patch_dataset(str(ingested), (8, 12, 12), patches_per_volume=64, seed=1, labelled_only=True)
    )
    assert len(patches) == 64 and all(p["volume"].shape == (8, 12, 12) for p in patches)
    centred_on_fg = [bool(p["foreground"]) for p in patches]
    assert 0.3 < np.mean(centred_on_fg) < 0.7  # balanced, though the lesion is ~1% of the voxels
    for p in patches:  # a foreground-centred patch contains the lesion; every patch is a real crop
        assert not p["foreground"] or p["label"].numpy().any()
        start = p["start"].numpy()
        region = tuple(slice(a, a + n) for a, n in zip(start, (8, 12, 12)))
        np.testing.assert_array_equal(p["volume"].numpy(), study["phantom"].hu[region])
    again = list(patch_dataset(str(ingested), (8, 12, 12), patches_per_volume=64, seed=1, labelled_only=True))
    assert [tuple(p["start"].numpy()) for p in patches] == [tuple(p["start"].numpy()) for p in again]


def test_missing_input_fails_before_writing(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["run", "ct-ingest", "--input", str(tmp_path / "nope"), "--output", str(out)]) != 0
    assert not out.exists()
    assert (
        cli.main(["run", "ct-ingest", "--input", str(tmp_path), "--output", str(out), "--hu-window", "5,-5"])
        != 0
    )
    assert not out.exists()


@pytest.mark.flink
def test_flink_gives_the_same_volumes_and_manifest(study, ingested, tmp_path, flink):
    out = tmp_path / "flink"
    config = CtIngestConfig(
        input=str(study["root"]), output=str(out), shards=3, block_above_mb=0.05, block=(8, 16, 16), halo=3
    )
    run_pipeline(build_ct_ingest, config, runner="FlinkRunner", beam_args=[*flink, "--parallelism=2"])
    for name in ("manifest.jsonl", "report.json"):
        assert (out / name).read_text() == (ingested / name).read_text(), name
    for i in range(3):  # same shard assignment, byte-identical records (parts concatenated in a fixed order)
        name = f"volumes-0000{i}-of-00003.tfrecord"
        assert (out / name).read_bytes() == (ingested / name).read_bytes(), name
