"""image-ingest on real photographs matplotlib ships plus the awkward files users' folders hold: CMYK,
grey, palette and RGBA images, an EXIF-rotated JPEG, an oversized one, and broken files."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from headrace.pipelines.images import IMAGE_SPEC, ImageIngestConfig, _hash, build_image_ingest
from headrace.runners import cli
from headrace.runners.beam_runner import run_pipeline
from headrace.transforms.tfrecord import read_examples

SAMPLE_DATA = Path(matplotlib.get_data_path()) / "sample_data"
HOPPER = SAMPLE_DATA / "grace_hopper.jpg"  # 512 x 600 RGB JPEG
LOGO = SAMPLE_DATA / "logo2.png"  # 542 x 130 RGBA PNG


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _halves(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue (stored orientation)."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2] = (255, 0, 0)
    a[:, size[0] // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images") / "in"
    (root / "people").mkdir(parents=True)
    shutil.copy(HOPPER, root / "people" / "hopper.jpg")
    hopper = Image.open(HOPPER)
    _save(hopper.convert("L"), root / "people" / "grey.png")
    _save(hopper.convert("CMYK"), root / "people" / "cmyk.jpg", format="JPEG")
    _save(hopper.resize((1200, 1400)), root / "people" / "large.jpg", format="JPEG")
    for i in range(6):
        _save(hopper.rotate(15 * i).crop((50, 50, 450, 450)), root / "people" / "crops" / f"c{i}.jpg")
    (root / "logos").mkdir()
    shutil.copy(LOGO, root / "logos" / "logo.png")
    _save(Image.open(LOGO).convert("P"), root / "logos" / "palette.gif")
    transparent = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    _save(transparent, root / "logos" / "transparent.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    _save(_halves(), root / "logos" / "rotated.jpg", format="JPEG", exif=exif.tobytes(), quality=100)
    for i in range(6):
        _save(
            Image.open(LOGO).convert("RGB").crop((i * 60, 0, i * 60 + 128, 128)), root / "logos" / f"l{i}.jpg"
        )
    # Broken files: each must be rejected with its reason.
    (root / "people" / "empty.jpg").write_bytes(b"")
    data = HOPPER.read_bytes()
    (root / "people" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "logos" / "notes.txt").write_text("not an image\n")
    (root / "logos" / "corrupt.png").write_bytes(LOGO.read_bytes()[:40] + b"\0" * 400)
    (root / "stray.jpg").write_bytes(data)
    (root / "logos" / ".hidden.jpg").write_bytes(data)  # hidden: not listed at all
    return root


@pytest.fixture(scope="module")
def ingested(folder):
    out = folder.parent / "out"
    config = ImageIngestConfig(input=str(folder), output=str(out), shards=3, max_side=640, eval_fraction=0.3)
    run_pipeline(build_image_ingest, config)
    return out


def _records(out: Path) -> dict[str, dict]:
    records = {}
    for split in ("train", "eval"):
        for r in read_examples(str(out / f"{split}-*.tfrecord"), IMAGE_SPEC):
            r = {k: v.item() if isinstance(v, np.ndarray) else v for k, v in r.items()}
            records[r["source"].decode()] = {**r, "split": split}
    return records


def test_report_reconciles_and_every_broken_file_is_rejected_with_its_reason(ingested):
    report = json.loads((ingested / "report.json").read_text())
    assert report["files"] == 25 == report["train"] + report["eval"] + report["rejected"]
    assert report["rejected"] == 5
    rejected = {}
    for line in (ingested / "rejected").glob("*.jsonl"):
        for row in map(json.loads, line.read_text().splitlines()):
            rejected[os.path.basename(row["source"])] = row["reason"]
    assert rejected["empty.jpg"] == "empty file"
    assert rejected["truncated.jpg"].startswith("corrupt or truncated JPEG image")
    assert rejected["notes.txt"].startswith("not an image")
    assert rejected["corrupt.png"].startswith("corrupt or truncated PNG image")
    assert rejected["stray.jpg"].startswith("not in a class folder")
    classes = json.loads((ingested / "classes.json").read_text())
    assert classes["classes"] == ["logos", "people"]
    assert report["per_class"] == {"logos": 10, "people": 10}
    assert (ingested / "samples.png").stat().st_size > 1000


def test_every_record_decodes_as_rgb_jpeg_to_the_size_it_carries(ingested):
    records = _records(ingested)
    assert len(records) == 20
    for source, r in records.items():
        pixels = tf.io.decode_jpeg(r["image"], channels=3).numpy()
        assert pixels.shape == (r["height"], r["width"], 3), source
        assert max(r["height"], r["width"]) <= 640, source
        assert r["label"] == (1 if source.startswith("people/") else 0), source
    # An RGB JPEG within --max-side keeps its bytes; the others are re-encoded.
    assert records["people/hopper.jpg"]["image"] == HOPPER.read_bytes()
    assert (records["people/large.jpg"]["height"], records["people/large.jpg"]["width"]) == (640, 549)


def test_the_manifest_holds_every_file_once_with_its_outcome(ingested):
    lines = [json.loads(x) for x in (ingested / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 25 and len({x["source"] for x in lines}) == 25
    assert [x["source"] for x in lines] == sorted(x["source"] for x in lines)
    records = _records(ingested)
    by_source = {x["source"]: x for x in lines}
    for source, r in records.items():
        line = by_source[source]
        assert (line["status"], line["label"], line["height"]) == (r["split"], r["label"], r["height"])
    assert by_source["people/hopper.jpg"]["reencoded"] is False
    assert by_source["people/large.jpg"]["reencoded"] is True
    assert (
        by_source["stray.jpg"]["status"] == "rejected" and "class folder" in by_source["stray.jpg"]["reason"]
    )
    assert sum(x["status"] == "rejected" for x in lines) == 5


def test_orientation_colour_modes_and_alpha_are_normalised(ingested):
    records = _records(ingested)
    rotated = tf.io.decode_jpeg(records["logos/rotated.jpg"]["image"]).numpy().astype(int)
    assert rotated.shape == (40, 20, 3)  # stored 40 wide x 20 high, shown upright: 20 wide x 40 high
    assert rotated[5, 10, 0] > 200 and rotated[5, 10, 2] < 60  # the stored left (red) half is on top
    assert rotated[35, 10, 2] > 200 and rotated[35, 10, 0] < 60
    white = tf.io.decode_jpeg(records["logos/transparent.png"]["image"]).numpy()
    assert white.min() > 245  # transparent pixels over white, not black
    hopper = np.asarray(Image.open(HOPPER), dtype=float)
    for name in ("grey.png", "cmyk.jpg"):
        pixels = tf.io.decode_jpeg(records[f"people/{name}"]["image"], channels=3).numpy().astype(float)
        assert pixels.shape == hopper.shape, name
        expected = hopper.mean(axis=2, keepdims=True) if name == "grey.png" else hopper
        assert np.abs(pixels - expected).mean() < 12, name  # the same picture, within JPEG loss


def test_the_split_is_a_hash_of_the_path_below_the_folder(ingested, folder, tmp_path):
    records = _records(ingested)
    assert {s for s, r in records.items() if r["split"] == "eval"} == {s for s in records if _hash(s) < 0.3}
    assert 0 < sum(r["split"] == "eval" for r in records.values()) < len(records)
    # The same folder elsewhere, through the CLI: the same split and the same bytes.
    moved = tmp_path / "elsewhere" / "photos"
    shutil.copytree(folder, moved)
    out = tmp_path / "out2"
    argv = ["run", "image-ingest", "--input", str(moved), "--output", str(out), "--max-side", "640"]
    assert cli.main([*argv, "--eval-fraction", "0.3", "--shards", "2"]) == 0
    again = _records(out)
    assert {s: (r["split"], r["image"]) for s, r in again.items()} == {
        s: (r["split"], r["image"]) for s, r in records.items()
    }


def test_a_folder_without_class_folders_is_refused(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(HOPPER.read_bytes())
    argv = ["run", "image-ingest", "--input", str(tmp_path / "flat"), "--output", str(tmp_path / "out")]
    assert cli.main(argv) == 1
    assert "no class folders" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_decompression_bomb_is_rejected(tmp_path):
    from headrace.transforms.imagefiles import decode_image

    big = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(big, format="PNG")  # 144 MP > Pillow's 89 MP limit
    with pytest.raises(ValueError, match="too many pixels"):
        decode_image(big.getvalue(), max_side=512, quality=90)
