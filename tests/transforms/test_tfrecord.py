"""The feature spec, the Beam TFRecord writer and the tf.data reader built from the same spec."""

from __future__ import annotations

import dataclasses
import gzip

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf

from headrace.core.errors import InputError
from headrace.runners.beam_runner import run_pipeline
from headrace.transforms.tfrecord import (
    Feature,
    FeatureSpec,
    SpecError,
    WriteTFRecordShards,
    encode_fixed,
    list_shards,
    read_examples,
    tfrecord_dataset,
)

# Every feature kind the spec supports: each dtype fixed (scalar, vector, matrix) and variable length,
# plus a fixed feature with a default that some records omit.
SPEC = FeatureSpec(
    "all_kinds",
    {
        "i_scalar": Feature("int64"),
        "f_vector": Feature("float32", (3,)),
        "f_matrix": Feature("float32", (2, 2)),
        "b_scalar": Feature("bytes"),
        "i_var": Feature("int64", None),
        "f_var": Feature("float32", None),
        "b_var": Feature("bytes", None),
        "i_default": Feature("int64", (2,), default=[-1, -1]),
    },
)


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        k = int(rng.integers(0, 4))
        record = {
            "i_scalar": i,
            "f_vector": rng.normal(size=3).astype(np.float32),
            "f_matrix": rng.normal(size=(2, 2)).astype(np.float32),
            "b_scalar": f"id-{i}".encode(),
            "i_var": rng.integers(-(2**40), 2**40, size=k),
            "f_var": rng.normal(size=k).astype(np.float32),
            "b_var": [f"t{j}" for j in range(k)],  # str is encoded as utf-8
        }
        if i % 3:
            record["i_default"] = [i, -i]
        records.append(record)
    return records


def _expected(record: dict) -> dict:
    return {
        "i_scalar": np.int64(record["i_scalar"]),
        "f_vector": np.asarray(record["f_vector"], np.float32),
        "f_matrix": np.asarray(record["f_matrix"], np.float32),
        "b_scalar": record["b_scalar"],
        "i_var": np.asarray(record["i_var"], np.int64),
        "f_var": np.asarray(record["f_var"], np.float32),
        "b_var": [s.encode() for s in record["b_var"]],
        "i_default": np.asarray(record.get("i_default", [-1, -1]), np.int64),
    }


def _assert_same(decoded: dict, expected: dict):
    assert set(decoded) == set(expected)
    for key, want in expected.items():
        got = decoded[key]
        if key in ("b_scalar",):
            assert bytes(np.asarray(got, dtype=object).item()) == want
        elif key == "b_var":
            assert [bytes(x) for x in np.asarray(got, dtype=object).ravel()] == want
        else:
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=key)


def test_encode_decode_round_trips_every_feature_kind():
    for record in _records(20):
        _assert_same(SPEC.decode(SPEC.encode(record)), _expected(record))


@dataclasses.dataclass(frozen=True)
class _WriteConfig:
    output: str
    n: int = 300
    shards: int = 3
    compression: str = ""
    poison: bool = False


def _build(pipeline, config: _WriteConfig):
    records = _records(config.n)
    if config.poison:
        records[-1] = {**records[-1], "f_vector": [1.0, 2.0]}  # wrong shape: encoding fails
    (
        pipeline
        | beam.Create(records, reshuffle=False)
        | WriteTFRecordShards(SPEC, f"{config.output}/part", config.shards, config.compression)
    )


@pytest.mark.parametrize("compression", ["", "gzip"])
def test_beam_writer_and_tfdata_reader_round_trip(tmp_path, compression):
    out = tmp_path / "out"
    run_pipeline(_build, _WriteConfig(output=str(out), compression=compression))
    suffix = ".tfrecord.gz" if compression else ".tfrecord"
    shards = sorted(p.name for p in out.glob("part-*"))
    assert shards == [f"part-0000{i}-of-00003{suffix}" for i in range(3)]
    if compression:
        with gzip.open(out / shards[0]) as f:
            f.read(16)  # really gzip

    expected = {int(r["i_scalar"]): _expected(r) for r in _records(300)}
    # The one-at-a-time reader.
    seen = {int(d["i_scalar"]): d for d in read_examples(str(out / "part-*"), SPEC)}
    assert sorted(seen) == sorted(expected)
    for key, decoded in seen.items():
        _assert_same(decoded, expected[key])

    # The batched tf.data reader: same records, ragged features as RaggedTensor.
    total = 0
    for batch in tfrecord_dataset(str(out / "part-*"), SPEC, batch_size=64):
        assert isinstance(batch["i_var"], tf.RaggedTensor)
        assert batch["f_matrix"].shape[1:] == (2, 2)
        for j in range(batch["i_scalar"].shape[0]):
            key = int(batch["i_scalar"][j])
            want = expected[key]
            np.testing.assert_array_equal(batch["f_vector"][j].numpy(), want["f_vector"])
            np.testing.assert_array_equal(batch["f_matrix"][j].numpy(), want["f_matrix"])
            np.testing.assert_array_equal(batch["i_var"][j].numpy(), want["i_var"])
            np.testing.assert_array_equal(batch["f_var"][j].numpy(), want["f_var"])
            assert batch["b_var"][j].numpy().tolist() == want["b_var"]
            assert batch["b_scalar"][j].numpy() == want["b_scalar"]
            np.testing.assert_array_equal(batch["i_default"][j].numpy(), want["i_default"])
            total += 1
    assert total == 300


def test_reader_shuffle_is_reproducible_with_a_seed(tmp_path):
    out = tmp_path / "out"
    run_pipeline(_build, _WriteConfig(output=str(out)))

    def order(seed):
        ds = tfrecord_dataset(str(out / "part-*"), SPEC, 50, shuffle=True, seed=seed, shuffle_buffer=100)
        return np.concatenate([b["i_scalar"].numpy() for b in ds])

    first, again, other = order(1), order(1), order(2)
    np.testing.assert_array_equal(first, again)
    assert sorted(first) == list(range(300))
    assert not np.array_equal(first, other)


def test_failed_write_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Exception, match="f_vector"):
        run_pipeline(_build, _WriteConfig(output=str(out), poison=True))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory or temp shard left behind


@pytest.mark.parametrize(
    "record, message",
    [
        ({"i_scalar": 1.5}, "expects integers"),
        ({"f_vector": [1, 2]}, r"expects shape \(3,\)"),
        ({"b_scalar": 3}, "expects bytes"),
        ({"f_vector": ["a", "b", "c"]}, "expects float32 numbers"),
        ({"nope": 1}, "unknown features"),
    ],
)
def test_spec_errors_name_the_feature(record, message):
    good = _records(1)[0]
    with pytest.raises(SpecError, match=message):
        SPEC.encode({**good, **record})


def test_missing_feature_without_default_is_an_error():
    record = _records(1)[0]
    del record["i_scalar"]
    with pytest.raises(SpecError, match="'i_scalar' is missing"):
        SPEC.encode(record)


def test_reader_names_a_pattern_that_matches_nothing(tmp_path):
    with pytest.raises(InputError, match="no TFRecord files match"):
        list_shards(str(tmp_path / "nothing-*.tfrecord"))


# -------------------------------------------------------------------------------------------------
# The vectorised encoder for fixed-shape records
# -------------------------------------------------------------------------------------------------

FIXED = FeatureSpec(
    "fixed",
    {
        "label": Feature("int64"),
        "ints": Feature("int64", (4,)),
        "floats": Feature("float32", (2, 3)),
        "name": Feature("bytes"),
        "cats": Feature("bytes", (3,)),
    },
)


def _fixed_columns(n: int, seed: int):
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    # Values spanning every varint length (1..10 bytes), negatives included.
    ints = rng.integers(-(2**63), 2**63 - 1, size=(n, 4), dtype=np.int64) >> rng.integers(0, 63, size=(n, 4))
    words = ["", "a", "héllo", "x" * 130, "tab\tand,comma", "\u2603" * 50]
    return {
        "label": rng.integers(0, 2, size=n),
        "ints": ints,
        "floats": rng.normal(size=(n, 2, 3)).astype(np.float32),
        "name": pa.array([words[i % len(words)] for i in range(n)]),
        "cats": [pa.array([words[(i + k) % len(words)] for i in range(n)]) for k in range(3)],
    }


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_encode_fixed_equals_protobuf(n):
    from tensorflow.core.example import example_pb2

    cols = _fixed_columns(n, seed=n)
    batch = encode_fixed(FIXED, cols, n)
    assert len(batch) == n
    for i, record in enumerate(batch):
        expected = FIXED.encode(
            {
                "label": cols["label"][i],
                "ints": cols["ints"][i],
                "floats": cols["floats"][i],
                "name": cols["name"][i].as_py(),
                "cats": [c[i].as_py() for c in cols["cats"]],
            }
        )
        assert example_pb2.Example.FromString(record) == example_pb2.Example.FromString(expected)
    # And TensorFlow's parser reads the batch.
    parsed = FIXED.parse_batch(tf.constant(list(batch)))
    np.testing.assert_array_equal(parsed["ints"].numpy(), cols["ints"])
    np.testing.assert_array_equal(parsed["floats"].numpy(), cols["floats"])
    assert [x.decode() for x in parsed["cats"][:, 2].numpy()] == cols["cats"][2].to_pylist()


def test_record_batch_take_and_sliced_arrow_input():
    cols = _fixed_columns(20, seed=3)
    batch = encode_fixed(FIXED, cols, 20)
    records = list(batch)
    assert list(batch.take(np.array([5, 0, 19]))) == [records[5], records[0], records[19]]
    # Arrow arrays that are slices of bigger ones (non-zero offsets) encode the same.
    sliced = {**cols, "name": cols["name"].slice(0, 20), "cats": [c.slice(0, 20) for c in cols["cats"]]}
    assert list(encode_fixed(FIXED, sliced, 20)) == records
    offset = {
        k: (
            v[5:15]
            if isinstance(v, np.ndarray)
            else [c.slice(5, 10) for c in v]
            if isinstance(v, list)
            else v.slice(5, 10)
        )
        for k, v in cols.items()
    }
    assert list(encode_fixed(FIXED, offset, 10)) == records[5:15]


def test_encode_fixed_refuses_variable_length_features():
    with pytest.raises(SpecError, match="variable length"):
        encode_fixed(SPEC, {}, 0)


def test_streamed_example_parses_like_the_proto(tmp_path):
    """example_chunks + write_record_chunks (no copies of large buffers) read back by tf.data."""
    from headrace.transforms.tfrecord import example_chunks, write_record_chunks

    spec = FeatureSpec(
        "streamed",
        {
            "id": Feature("bytes"),
            "volume": Feature("bytes"),
            "shape": Feature("int64", (3,)),
            "spacing": Feature("float32", (3,)),
            "offset": Feature("int64", (2,)),
            "label": Feature("bytes", default=b""),
        },
    )
    volume = np.random.default_rng(0).normal(size=(3, 40, 50)).astype(np.float32)
    big = np.arange(3 * (1 << 20), dtype=np.float32)  # 12 MB: checksummed in 4 MiB pieces
    records = [
        {
            "id": "a",
            "volume": volume,
            "shape": [3, 40, 50],
            "spacing": [2.5, 0.7, 0.7],
            "offset": [-5, 1 << 40],
        },
        {
            "id": b"b",
            "volume": big,
            "shape": [3, 1024, 1024],
            "spacing": [1, 1, 1],
            "offset": [0, 0],
            "label": b"x",
        },
    ]
    path = tmp_path / "s.tfrecord"
    with open(path, "wb") as f:
        for r in records:
            write_record_chunks(f, example_chunks(spec, r))
    parsed = [
        tf.io.parse_single_example(s, spec.tf_features()) for s in tf.data.TFRecordDataset(str(path))
    ]  # TFRecordDataset verifies the CRCs
    assert len(parsed) == 2
    for r, p in zip(records, parsed):
        np.testing.assert_array_equal(np.frombuffer(p["volume"].numpy(), np.float32), r["volume"].ravel())
        np.testing.assert_array_equal(p["offset"].numpy(), r["offset"])
        np.testing.assert_allclose(p["spacing"].numpy(), r["spacing"])
        assert p["label"].numpy() == r.get("label", b"")
        streamed = b"".join(bytes(c) for c in example_chunks(spec, r))
        proto = spec.encode({**r, "volume": r["volume"].tobytes()})
        assert len(streamed) == len(proto)  # same wire format (map entries may come in another order)
        assert spec.decode(streamed)["id"] == spec.decode(proto)["id"]
    with pytest.raises(SpecError, match="C-contiguous"):
        example_chunks(spec, {**records[0], "volume": volume[:, ::2]})


def test_sorted_shards_are_the_same_bytes_whatever_the_input_order(tmp_path, fnapi_pipeline):
    """The cluster writes what the in-process runner writes: shard by a hash of the record, records in byte
    order; every shard exists, empty or not; every record once, readable."""
    from headrace.transforms.tfrecord import WriteSortedShards

    records = _records(200, seed=4)
    outputs = []
    for i, order in enumerate([records, records[::-1], records[100:] + records[:100]]):
        out = tmp_path / f"run{i}"
        with fnapi_pipeline() as p:
            p | beam.Create(order, reshuffle=True) | WriteSortedShards(SPEC, str(out / "part"), 3)
        outputs.append({f.name: f.read_bytes() for f in sorted(out.iterdir())})
    assert sorted(outputs[0]) == [f"part-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert outputs[0] == outputs[1] == outputs[2]
    seen = sorted(int(d["i_scalar"]) for d in read_examples(str(tmp_path / "run0" / "part-*"), SPEC))
    assert seen == list(range(200))
