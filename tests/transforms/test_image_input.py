"""The image input pipeline on image-ingest shards of the photographs installed packages ship, checked
against decoding the JPEGs whole with TensorFlow and cropping by hand."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tensorflow as tf

from headrace.pipelines.images import IMAGE_SPEC, ImageIngestConfig, build_image_ingest
from headrace.pipelines.images_data import write_photos
from headrace.runners.beam_runner import run_pipeline
from headrace.transforms.image_input import MEAN_RGB, STDDEV_RGB, image_dataset, naive_dataset
from headrace.transforms.tfrecord import read_examples

SIZE = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_photos(root / "in", per_class=6, max_side=160, seed=3)
    out = root / "out"
    run_pipeline(
        build_image_ingest,
        ImageIngestConfig(input=str(root / "in"), output=str(out), shards=4, eval_fraction=0.25),
    )
    return out


def _pixels(batch) -> np.ndarray:
    """Normalised images back to 0..255."""
    return batch["image"].numpy().astype(np.float32) * np.float32(STDDEV_RGB) + np.float32(MEAN_RGB)


def _records(shards, split):
    return list(read_examples(str(shards / f"{split}-*.tfrecord"), IMAGE_SPEC))


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.round(image).astype(np.uint8).tobytes()).hexdigest()


def test_eval_is_the_central_crop_of_the_whole_decoded_jpeg(shards):
    records = _records(shards, "eval")
    assert len(records) > 5
    batches = list(image_dataset(str(shards), "eval", 4, image_size=SIZE))
    got = np.concatenate([_pixels(b) for b in batches])
    labels = np.concatenate([b["label"].numpy() for b in batches])
    assert got.shape == (len(records), SIZE, SIZE, 3) and batches[0]["image"].dtype == tf.float32
    assert labels.tolist() == [int(r["label"]) for r in records]  # eval keeps file order, every record
    for image, r in zip(got, records):
        whole = tf.io.decode_jpeg(r["image"].item(), channels=3)  # decoded whole, cropped by hand
        h, w = int(r["height"]), int(r["width"])
        side = int(SIZE / (SIZE + 32) * min(h, w))
        top, left = (h - side + 1) // 2, (w - side + 1) // 2
        crop = whole[top : top + side, left : left + side]
        expected = tf.cast(tf.round(tf.image.resize(crop, [SIZE, SIZE])), tf.float32).numpy()
        assert np.abs(image - expected).mean() < 1.0  # decode_and_crop decodes the same pixels
        assert np.abs(image - expected).max() <= 24


def test_eval_without_crop_padding_is_the_whole_image_resized(shards):
    records = _records(shards, "eval")
    (batch,) = image_dataset(str(shards), "eval", len(records), image_size=SIZE, crop_padding=0).take(1)
    for image, r in zip(_pixels(batch), records):
        whole = tf.io.decode_jpeg(r["image"].item(), channels=3)
        if int(r["height"]) != int(r["width"]):
            side = min(int(r["height"]), int(r["width"]))
            top, left = (int(r["height"]) - side + 1) // 2, (int(r["width"]) - side + 1) // 2
            whole = whole[top : top + side, left : left + side]
        expected = tf.round(tf.image.resize(whole, [SIZE, SIZE])).numpy()
        assert np.abs(image - expected).mean() < 1.0


def test_the_cached_eval_set_repeats_exactly_and_bfloat16_is_offered(shards):
    ds = image_dataset(str(shards), "eval", 4, image_size=SIZE)
    first = [b["image"].numpy() for b in ds]
    second = [b["image"].numpy() for b in ds]
    assert all(np.array_equal(a, b) for a, b in zip(first, second)) and len(first) == len(second)
    (b16,) = image_dataset(str(shards), "eval", 64, image_size=SIZE, dtype="bfloat16").take(1)
    assert b16["image"].dtype == tf.bfloat16 and b16["label"].dtype == tf.int32
    np.testing.assert_allclose(
        b16["image"].numpy().astype(np.float32), np.concatenate(first)[: len(b16["image"])], atol=0.05
    )


def test_a_full_area_crop_is_the_whole_image_resized_maybe_flipped(shards):
    records = {_digest(tf.cast(tf.round(tf.image.resize(tf.io.decode_jpeg(r["image"].item()), [SIZE, SIZE])),
                                tf.uint8).numpy()): r for r in _records(shards, "train")}  # fmt: skip
    ds = image_dataset(
        str(shards), "train", 8, image_size=SIZE, repeat=False, drop_remainder=False,
        area_range=(1.0, 1.0), aspect_ratio_range=(0.01, 100.0), seed=5,
    )  # fmt: skip
    flipped = same = 0
    for batch in ds:
        for image in _pixels(batch):
            if _digest(image) in records:
                same += 1
            elif _digest(image[:, ::-1]) in records:
                flipped += 1
    assert same + flipped == len(records)  # every record once, whole
    assert same > 3 and flipped > 3  # flipped about half the time


def test_training_crops_depend_on_the_seed_only_not_on_parallelism(shards):
    def epoch(seed, threads):
        ds = image_dataset(
            str(shards), "train", 8, image_size=SIZE, repeat=False, drop_remainder=False, seed=seed,
            private_threads=threads,
        )  # fmt: skip
        return sorted(_digest(image) for batch in ds for image in _pixels(batch))

    a, b, c = epoch(1, 1), epoch(1, 4), epoch(2, 4)
    assert a == b  # the same crops, whatever order the parallel map yields them in
    assert len(set(a) & set(c)) < len(a) // 4  # another seed, other crops
    assert len(a) == len(_records(shards, "train"))


def test_clients_read_disjoint_files_that_cover_the_set(shards):
    def train(**kwargs):
        ds = image_dataset(
            str(shards), "train", 8, image_size=SIZE, repeat=False, drop_remainder=False,
            area_range=(1.0, 1.0), aspect_ratio_range=(0.01, 100.0), **kwargs,
        )  # fmt: skip
        return {_digest(np.minimum(image, image[:, ::-1])) for batch in ds for image in _pixels(batch)}

    whole = train()
    halves = [train(num_clients=2, client_id=i) for i in range(2)]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == whole and all(halves)
    with pytest.raises(ValueError, match="4 shard files for 8 clients"):
        image_dataset(str(shards), "train", 8, num_clients=8, client_id=0)


def test_the_naive_baseline_yields_the_same_kind_of_batches(shards):
    (batch,) = naive_dataset(str(shards), "train", 8, image_size=SIZE).take(1)
    assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["label"].dtype == tf.int32
    assert _pixels(batch).min() > -0.01 and _pixels(batch).max() < 255.01
