"""Array features (dtype and shape in the spec) and spec.json: what a reader of an output can rely on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from headrace.core.errors import InputError
from headrace.transforms.tfrecord import (
    Feature,
    FeatureSpec,
    SpecError,
    example_chunks,
    output_dataset,
    read_spec,
    write_record_chunks,
    write_spec,
)

VOLUMES = FeatureSpec(
    "volumes",
    {
        "id": Feature("bytes"),
        "shape": Feature("int64", (3,)),
        "volume": Feature.array("float32", "shape"),
        "label": Feature.array("uint8", "shape", optional=True),
    },
)


def _record(seed: int, labelled: bool) -> dict:
    rng = np.random.default_rng(seed)
    shape = (2 + seed, 3, 4)
    record = {
        "id": f"v{seed}".encode(),
        "shape": list(shape),
        "volume": rng.normal(size=shape).astype(np.float32),
    }
    if labelled:
        record["label"] = rng.integers(0, 3, size=shape).astype(np.uint8)
    return record


def test_arrays_round_trip_through_both_encoders_numpy_and_tensorflow(tmp_path):
    records = [_record(0, True), _record(1, False)]
    path = tmp_path / "volumes-00000-of-00001.tfrecord"
    with open(path, "wb") as f:  # the streamed encoder, arrays written from their buffers
        for r in records:
            write_record_chunks(f, example_chunks(VOLUMES, r))
    streamed = [bytes(x.numpy()) for x in tf.data.TFRecordDataset(str(path))]
    for r, serialized in zip(records, streamed):
        # The same example as the proto encoder's (map entries may come in another order).
        proto = VOLUMES.decode(VOLUMES.encode(r), decode_arrays=False)
        ours = VOLUMES.decode(serialized, decode_arrays=False)
        assert {k: v.tolist() for k, v in ours.items()} == {k: v.tolist() for k, v in proto.items()}
        as_numpy = VOLUMES.decode(serialized)
        as_tf = {k: v.numpy() for k, v in VOLUMES.parse_single(tf.constant(serialized)).items()}
        for got in (as_numpy, as_tf):
            np.testing.assert_array_equal(got["volume"], r["volume"])
            assert got["volume"].dtype == np.float32 and got["label"].dtype == np.uint8
            if "label" in r:
                np.testing.assert_array_equal(got["label"], r["label"])
                assert got["has_label"]
            else:  # an absent optional array reads as zeros of the record's shape
                assert (
                    not got["has_label"]
                    and got["label"].shape == r["volume"].shape
                    and not got["label"].any()
                )
        raw = VOLUMES.decode(serialized, decode_arrays=False)["volume"].item()
        np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(r["volume"].shape), r["volume"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"volume": np.zeros((2, 3, 4), np.float64)}, "expects float32, got float64"),
        ({"volume": np.zeros((2, 3, 5), np.float32)}, r"has shape \(2, 3, 5\), 'shape' says"),
        ({"volume": b"raw bytes"}, "expects a numpy float32 array"),
    ],
)
def test_arrays_of_the_wrong_dtype_or_shape_are_refused_by_both_encoders(change, message):
    record = {**_record(0, True), **change}
    with pytest.raises(SpecError, match=message):
        VOLUMES.encode(record)
    with pytest.raises(SpecError, match=message):
        example_chunks(VOLUMES, record)


def test_an_array_needs_an_int64_shape_feature():
    with pytest.raises(ValueError, match="not an int64 vector"):
        FeatureSpec("bad", {"volume": Feature.array("float32", "shape"), "shape": Feature("float32", (3,))})


def test_spec_json_round_trips_and_readers_refuse_another_spec(tmp_path):
    other = FeatureSpec("ex", {"x": Feature("float32", (2,)), "tokens": Feature("int64", None)})
    write_spec(str(tmp_path), {"volumes": VOLUMES, "train": other})
    body = json.loads((tmp_path / "spec.json").read_text())
    assert set(body["records"]) == {"volumes", "train"}
    assert body["records"]["volumes"]["features"]["volume"]["array_dtype"] == "float32"
    assert read_spec(str(tmp_path), "volumes") == VOLUMES
    assert read_spec(str(tmp_path), "train", other) == other
    changed = FeatureSpec("ex", {"x": Feature("float32", (3,)), "tokens": Feature("int64", None)})
    with pytest.raises(InputError, match="differing from this reader's in x"):
        read_spec(str(tmp_path), "train", changed)
    with pytest.raises(InputError, match="no 'eval' records"):
        read_spec(str(tmp_path), "eval")
    with pytest.raises(InputError, match=r"no spec\.json"):
        output_dataset(str(tmp_path / "elsewhere"), "train", 8, other)
