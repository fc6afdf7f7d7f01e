"""Sharded TFRecords of `tf.train.Example`: one feature spec gives the Beam writer and the tf.data reader.

A `FeatureSpec` is declared once per record type, next to the pipeline that produces it. The same object

* encodes a record (a mapping of feature name to value) into a serialized `tf.train.Example`, checking
  every value against its declared dtype and shape (`FeatureSpec.encode`), which the Beam writer
  `WriteTFRecordShards` maps over a PCollection;
* gives the parse spec that `tfrecord_dataset` hands to `tf.io.parse_example` on whole batches;
* decodes a serialized example back to numpy without TensorFlow's graph machinery (`FeatureSpec.decode`),
  for tests and Beam steps that read what another step wrote.

Feature kinds: fixed shape (``shape=()`` scalar, ``(k,)`` vector, any rank, stored flattened) and
variable length (``shape=None``, parsed as a `tf.RaggedTensor` in batches). Dtypes: ``int64``,
``float32`` and ``bytes`` (the three a `tf.train.Example` can hold).

The reader follows the tf.data performance guide: files interleaved in parallel, batches parsed
vectorised (`tf.io.parse_example` on a batch is several times faster than per example), and prefetch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import apache_beam as beam
import numpy as np

from headrace.runners.errors import InputError

__all__ = [
    "Feature",
    "FeatureSpec",
    "SpecError",
    "WriteTFRecordShards",
    "list_shards",
    "read_examples",
    "tfrecord_dataset",
]

DType = Literal["int64", "float32", "bytes"]


class SpecError(ValueError):
    """A record does not match its feature spec; the message names the spec and the feature."""


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature of a record: dtype, shape (None = variable length) and a default when absent."""

    dtype: DType
    shape: tuple[int, ...] | None = ()
    default: Any = None
    description: str = ""

    def __post_init__(self):
        if self.dtype not in ("int64", "float32", "bytes"):
            raise ValueError(f"dtype must be int64, float32 or bytes, got {self.dtype!r}")

    @property
    def size(self) -> int | None:
        return None if self.shape is None else math.prod(self.shape)


def _tf():
    # TensorFlow is imported on first use: Beam workers that only run non-TF steps never pay for it.
    import tensorflow as tf

    return tf


class FeatureSpec:
    """The declared features of one record type (see module docstring)."""

    def __init__(self, name: str, features: Mapping[str, Feature]):
        if not features:
            raise ValueError("a feature spec needs at least one feature")
        self.name = name
        self.features = dict(features)
        self._example_cls = None

    def __repr__(self) -> str:
        return f"FeatureSpec({self.name!r}, {list(self.features)})"

    def __reduce__(self):  # pickled into Beam DoFns without the cached proto class
        return (FeatureSpec, (self.name, self.features))

    # -- encoding -----------------------------------------------------------------------------------

    def _example(self):
        if self._example_cls is None:
            from tensorflow.core.example import example_pb2

            self._example_cls = example_pb2.Example
        return self._example_cls

    def _values(self, key: str, feature: Feature, value: Any) -> Sequence[Any]:
        if feature.dtype == "bytes":
            items = [value] if isinstance(value, bytes | str) else list(np.ravel(value))
            out = []
            for item in items:
                if isinstance(item, str):
                    item = item.encode("utf-8")
                elif isinstance(item, np.bytes_):
                    item = bytes(item)
                if not isinstance(item, bytes):
                    raise SpecError(f"{self.name}: feature {key!r} expects bytes, got {type(item).__name__}")
                out.append(item)
        else:
            arr = np.asarray(value)
            if arr.dtype == object or arr.dtype.kind not in "biuf":
                raise SpecError(
                    f"{self.name}: feature {key!r} expects {feature.dtype} numbers, got {arr.dtype}"
                )
            if feature.dtype == "int64":
                if arr.dtype.kind == "f" and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
                    raise SpecError(f"{self.name}: feature {key!r} expects integers, got {value!r}")
                out = arr.astype(np.int64).ravel()
            else:
                out = arr.astype(np.float32).ravel()
        if feature.size is not None and len(out) != feature.size:
            raise SpecError(
                f"{self.name}: feature {key!r} expects shape {feature.shape} "
                f"({feature.size} values), got {len(out)}"
            )
        return out

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Serializes `record` as a `tf.train.Example`; raises SpecError naming the offending feature."""
        unknown = set(record) - set(self.features)
        if unknown:
            raise SpecError(f"{self.name}: unknown features {sorted(unknown)}")
        example = self._example()()
        fmap = example.features.feature
        for key, feature in self.features.items():
            value = record.get(key)
            if value is None:
                if feature.default is None:
                    raise SpecError(f"{self.name}: feature {key!r} is missing")
                continue  # absent: the parser fills in the default
            values = self._values(key, feature, value)
            if feature.dtype == "bytes":
                fmap[key].bytes_list.value.extend(values)
            elif feature.dtype == "int64":
                fmap[key].int64_list.value.extend(values.tolist())
            else:
                fmap[key].float_list.value.extend(values.tolist())
        return example.SerializeToString()

    # -- decoding -----------------------------------------------------------------------------------

    def decode(self, serialized: bytes) -> dict[str, np.ndarray]:
        """Parses one serialized example to numpy (fixed features reshaped, bytes as object arrays)."""
        example = self._example().FromString(serialized)
        fmap = example.features.feature
        out = {}
        for key, feature in self.features.items():
            if key not in fmap:
                if feature.default is None:
                    raise SpecError(f"{self.name}: feature {key!r} is missing in a stored example")
                value = np.broadcast_to(
                    np.asarray(feature.default, dtype=_np_dtype(feature.dtype)), feature.shape or ()
                ).copy()
                out[key] = value
                continue
            f = fmap[key]
            if feature.dtype == "bytes":
                value = np.array(list(f.bytes_list.value), dtype=object)
            elif feature.dtype == "int64":
                value = np.array(f.int64_list.value, dtype=np.int64)
            else:
                value = np.array(f.float_list.value, dtype=np.float32)
            if feature.shape is not None:
                value = value.reshape(feature.shape)
            out[key] = value
        return out

    # -- TensorFlow ---------------------------------------------------------------------------------

    def tf_features(self) -> dict[str, Any]:
        """The `tf.io.parse_example` spec: FixedLenFeature for fixed shapes, RaggedFeature otherwise."""
        tf = _tf()
        dtypes = {"int64": tf.int64, "float32": tf.float32, "bytes": tf.string}
        spec = {}
        for key, feature in self.features.items():
            dtype = dtypes[feature.dtype]
            if feature.shape is None:
                spec[key] = tf.io.RaggedFeature(dtype=dtype, row_splits_dtype=tf.int64)
            else:
                default = None
                if feature.default is not None:
                    default = np.broadcast_to(
                        np.asarray(feature.default, dtype=_np_dtype(feature.dtype)), feature.shape
                    ).copy()
                spec[key] = tf.io.FixedLenFeature(feature.shape, dtype, default_value=default)
        return spec

    def parse_batch(self, serialized):
        """Parses a [batch] string tensor of serialized examples into a dict of batched tensors."""
        return _tf().io.parse_example(serialized, self.tf_features())


def _np_dtype(dtype: DType):
    return {"int64": np.int64, "float32": np.float32, "bytes": object}[dtype]


# -------------------------------------------------------------------------------------------------
# Beam writer
# -------------------------------------------------------------------------------------------------


class _Encode(beam.DoFn):
    def __init__(self, spec: FeatureSpec):
        self._spec = spec
        self._written = beam.metrics.Metrics.counter("tfrecord", f"{spec.name}_examples_encoded")

    def process(self, record):
        yield self._spec.encode(record)
        self._written.inc()


@beam.ptransform_fn
@beam.typehints.with_input_types(dict)
@beam.typehints.with_output_types(str)
def WriteTFRecordShards(
    pcoll,
    spec: FeatureSpec,
    file_path_prefix: str,
    num_shards: int,
    compression: Literal["", "gzip"] = "",
):
    """Writes records (dicts matching `spec`) as ``PREFIX-SSSSS-of-NNNNN.tfrecord[.gz]`` shards.

    Beam's file sink writes each shard to a temporary file and renames it when the bundle commits, and
    `headrace.runners.beam_runner.run_pipeline` stages the whole output directory, so a failed write leaves
    no shard behind. Returns the written paths.
    """
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1 (a fixed count keeps the output layout reproducible)")
    from apache_beam.io.filesystem import CompressionTypes

    return (
        pcoll
        | "Encode" >> beam.ParDo(_Encode(spec))
        | "Write"
        >> beam.io.WriteToTFRecord(
            file_path_prefix,
            file_name_suffix=".tfrecord" + (".gz" if compression == "gzip" else ""),
            num_shards=num_shards,
            compression_type=CompressionTypes.GZIP
            if compression == "gzip"
            else CompressionTypes.UNCOMPRESSED,
        )
    )


# -------------------------------------------------------------------------------------------------
# Readers
# -------------------------------------------------------------------------------------------------


def list_shards(file_pattern: str | Sequence[str]) -> list[str]:
    """Sorted files matching the pattern(s); raises InputError naming the pattern when none match."""
    tf = _tf()
    patterns = [file_pattern] if isinstance(file_pattern, str) else list(file_pattern)
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    if not files:
        raise InputError(f"no TFRecord files match {', '.join(patterns)}")
    return files


def _compression_of(files: Sequence[str]) -> str:
    gz = [f.endswith(".gz") for f in files]
    if any(gz) and not all(gz):
        raise InputError("mixed gzip and plain TFRecord files: " + ", ".join(files[:4]))
    return "GZIP" if gz and gz[0] else ""


def tfrecord_dataset(
    file_pattern: str | Sequence[str],
    spec: FeatureSpec,
    batch_size: int,
    *,
    shuffle: bool = False,
    shuffle_buffer: int = 10_000,
    seed: int | None = None,
    repeat: bool = False,
    drop_remainder: bool = False,
    cycle_length: int | None = None,
    deterministic: bool | None = None,
    prefetch: bool = True,
):
    """A tf.data pipeline over the shards: parallel interleave, shuffle, batched parsing, prefetch.

    Yields dicts of batched tensors (RaggedTensor for variable-length features). Without `shuffle` the
    order is deterministic (shards in name order, interleaved round-robin); with it, pass `seed` for a
    reproducible order.
    """
    tf = _tf()
    files = list_shards(file_pattern)
    compression = _compression_of(files)
    autotune = tf.data.AUTOTUNE
    if deterministic is None:
        deterministic = not shuffle or seed is not None
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=compression, buffer_size=1 << 20),
        cycle_length=min(len(files), cycle_length or 8),
        block_length=1,
        num_parallel_calls=autotune,
        deterministic=deterministic,
    )
    if repeat:
        ds = ds.repeat()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(spec.parse_batch, num_parallel_calls=autotune, deterministic=deterministic)
    if prefetch:
        ds = ds.prefetch(autotune)
    return ds


def read_examples(file_pattern: str | Sequence[str], spec: FeatureSpec) -> Iterable[dict[str, np.ndarray]]:
    """Every record in the shards, one at a time, decoded to numpy (for tests and small outputs)."""
    tf = _tf()
    files = list_shards(file_pattern)
    compression = _compression_of(files)
    for f in files:
        for serialized in tf.data.TFRecordDataset(f, compression_type=compression).as_numpy_iterator():
            yield spec.decode(serialized)
