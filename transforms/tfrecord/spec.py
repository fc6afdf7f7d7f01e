"""Feature specs: a record type declared once, from which the writer, the readers and spec.json derive.

A `FeatureSpec` is declared once per record type, next to the pipeline that produces it. The same object

* encodes a record (a mapping of feature name to value) into a serialized `tf.train.Example`, checking
  every value against its declared dtype and shape (`FeatureSpec.encode`; the vectorised and streamed
  encoders of `headrace.transforms.tfrecord.wire` check the same);
* gives the parse spec that `tfrecord_dataset` hands to `tf.io.parse_example` on whole batches, and
  `parse_single` for records whose arrays differ in shape (volumes);
* decodes a serialized example back to numpy without TensorFlow's graph machinery (`FeatureSpec.decode`);
* is written into every output folder as ``spec.json`` (`write_spec`), and read back by the pipelines'
  ``dataset(out, split)`` readers (`read_spec`), which refuse an output whose spec differs from theirs.

Feature kinds: fixed shape (``shape=()`` scalar, ``(k,)`` vector, any rank, stored flattened), variable
length (``shape=None``, parsed as a `tf.RaggedTensor` in batches), and tensors (`Feature.array`): one
raw little-endian array in a bytes feature, its element dtype declared in the spec and its shape read
from another feature of the record, so that a [D, H, W] volume is one buffer, written without copies and
decoded with one op. Dtypes: ``int64``, ``float32`` and ``bytes`` (the three a `tf.train.Example` can hold).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from headrace.core.errors import InputError

__all__ = [
    "SPEC_FILE",
    "Feature",
    "FeatureSpec",
    "SpecError",
    "read_spec",
    "read_specs",
    "write_spec",
]

SPEC_FILE = "spec.json"

DType = Literal["int64", "float32", "bytes"]
# Element dtypes of array features (stored little-endian).
ARRAY_DTYPES = ("float32", "float64", "int16", "int32", "int64", "uint8", "uint16")


class SpecError(ValueError):
    """A record does not match its feature spec; the message names the spec and the feature."""


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature of a record: dtype, shape (None = variable length) and a default when absent.

    An array feature (`array`) is a bytes feature holding one raw array: `array_dtype` is its element
    dtype, `shape_from` the int64 feature of the same record that holds its shape."""

    dtype: DType
    shape: tuple[int, ...] | None = ()
    default: Any = None
    description: str = ""
    array_dtype: str | None = None
    shape_from: str | None = None

    def __post_init__(self):
        if self.dtype not in ("int64", "float32", "bytes"):
            raise ValueError(f"dtype must be int64, float32 or bytes, got {self.dtype!r}")
        if self.array_dtype is not None:
            if self.array_dtype not in ARRAY_DTYPES:
                raise ValueError(f"array dtype must be one of {ARRAY_DTYPES}, got {self.array_dtype!r}")
            if self.dtype != "bytes" or self.shape != () or not self.shape_from:
                raise ValueError("an array feature is a scalar bytes feature with a shape_from feature")

    @classmethod
    def array(cls, dtype: str, shape_from: str, *, optional: bool = False, description: str = "") -> Feature:
        """A raw `dtype` array whose shape is the record's `shape_from` feature; `optional` ones may be
        absent (stored as b"", read back as zeros with ``has_<name>`` False)."""
        return cls(
            "bytes", (), b"" if optional else None, description, array_dtype=dtype, shape_from=shape_from
        )

    @property
    def is_array(self) -> bool:
        return self.array_dtype is not None

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
        for key, f in self.features.items():
            if f.is_array:
                shape = self.features.get(f.shape_from)
                if shape is None or shape.dtype != "int64" or shape.shape is None or len(shape.shape) != 1:
                    raise ValueError(
                        f"{name}: {key!r} takes its shape from {f.shape_from!r}, not an int64 vector"
                    )
        self._example_cls = None

    def __repr__(self) -> str:
        return f"FeatureSpec({self.name!r}, {list(self.features)})"

    def __eq__(self, other) -> bool:
        return isinstance(other, FeatureSpec) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_json(), sort_keys=True))

    def arrays(self) -> dict[str, Feature]:
        return {k: f for k, f in self.features.items() if f.is_array}

    # -- spec.json --------------------------------------------------------------------------------

    def to_json(self) -> dict:
        features = {}
        for key, f in self.features.items():
            default = f.default
            if isinstance(default, bytes):
                default = default.decode("utf-8")
            elif isinstance(default, np.ndarray | np.generic):
                default = default.tolist()
            entry = {
                "dtype": f.dtype,
                "shape": None if f.shape is None else list(f.shape),
                "default": default,
            }
            if f.is_array:
                entry.update(array_dtype=f.array_dtype, shape_from=f.shape_from)
            if f.description:
                entry["description"] = f.description
            features[key] = entry
        return {"name": self.name, "features": features}

    @classmethod
    def from_json(cls, data: Mapping) -> FeatureSpec:
        features = {}
        for key, e in data["features"].items():
            default = e.get("default")
            if e["dtype"] == "bytes" and isinstance(default, str):
                default = default.encode("utf-8")
            shape = None if e.get("shape") is None else tuple(e["shape"])
            features[key] = Feature(
                e["dtype"],
                shape,
                default,
                e.get("description", ""),
                array_dtype=e.get("array_dtype"),
                shape_from=e.get("shape_from"),
            )
        return cls(data["name"], features)

    def check_arrays(self, record: Mapping[str, Any]) -> None:
        """Array values must be numpy arrays of the declared dtype and of the shape the record gives."""
        for key, f in self.arrays().items():
            value = record.get(key)
            if value is None or (isinstance(value, bytes) and not value and f.default is not None):
                continue
            if not isinstance(value, np.ndarray):
                raise SpecError(f"{self.name}: feature {key!r} expects a numpy {f.array_dtype} array")
            if value.dtype != np.dtype(f.array_dtype):
                raise SpecError(f"{self.name}: feature {key!r} expects {f.array_dtype}, got {value.dtype}")
            shape = record.get(f.shape_from)
            if shape is None or tuple(int(s) for s in np.ravel(shape)) != value.shape:
                raise SpecError(
                    f"{self.name}: feature {key!r} has shape {value.shape}, {f.shape_from!r} says {shape}"
                )

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
        self.check_arrays(record)
        example = self._example()()
        fmap = example.features.feature
        for key, feature in self.features.items():
            value = record.get(key)
            if feature.is_array and isinstance(value, np.ndarray):
                value = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
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

    def encode_columns(self, columns: Mapping[str, Any], n: int) -> list[bytes]:
        """Serializes `n` records given column-wise, the fast path for batched pipelines.

        Fixed-shape numeric features: arrays [n, *shape]. Bytes features: a sequence of n values
        (scalars) or of n sequences (fixed vectors). Variable-length features: a sequence of n
        sequences. Shapes and dtypes are checked once per column, not per record.
        """
        plan = []
        for key, feature in self.features.items():
            if key not in columns:
                raise SpecError(f"{self.name}: column {key!r} is missing")
            col = columns[key]
            if feature.dtype == "bytes":
                rows = (
                    [[v.encode() if isinstance(v, str) else v for v in r] for r in col]
                    if feature.shape != ()
                    else [[v.encode() if isinstance(v, str) else v] for v in col]
                )
                kind = "bytes_list"
            elif feature.shape is None:
                rows = [list(r) for r in col]
                kind = "int64_list" if feature.dtype == "int64" else "float_list"
            else:
                arr = np.asarray(col, dtype=np.int64 if feature.dtype == "int64" else np.float32)
                arr = arr.reshape(n, -1)
                if arr.shape[1] != feature.size:
                    raise SpecError(
                        f"{self.name}: column {key!r} has {arr.shape[1]} values per record, "
                        f"expected {feature.size} (shape {feature.shape})"
                    )
                rows = arr.tolist()
                kind = "int64_list" if feature.dtype == "int64" else "float_list"
            if len(rows) != n:
                raise SpecError(f"{self.name}: column {key!r} has {len(rows)} records, expected {n}")
            plan.append((key, kind, rows))
        example_cls = self._example()
        out = []
        for i in range(n):
            example = example_cls()
            fmap = example.features.feature
            for key, kind, rows in plan:
                getattr(fmap[key], kind).value.extend(rows[i])
            out.append(example.SerializeToString())
        return out

    # -- decoding -----------------------------------------------------------------------------------

    def decode(self, serialized: bytes, *, decode_arrays: bool = True) -> dict[str, np.ndarray]:
        """Parses one serialized example to numpy (fixed features reshaped, bytes as object arrays, array
        features decoded unless `decode_arrays` is False)."""
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
        for key, f in self.arrays().items() if decode_arrays else ():
            raw, shape = out[key].item(), tuple(int(s) for s in out[f.shape_from])
            if f.default is not None:
                out[f"has_{key}"] = np.bool_(len(raw) > 0)
            dtype = np.dtype(f.array_dtype).newbyteorder("<")
            out[key] = np.frombuffer(raw, dtype).reshape(shape) if raw else np.zeros(shape, f.array_dtype)
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
        """Parses a [batch] string tensor of serialized examples into a dict of batched tensors (array
        features stay raw bytes: their shapes may differ within a batch)."""
        return _tf().io.parse_example(serialized, self.tf_features())

    def parse_single(self, serialized, *, decode_arrays: bool = True):
        """Parses one serialized example; array features are decoded to tensors of their record's shape
        (`decode_arrays`) unless asked not to (to filter records before paying for their voxels)."""
        ex = _tf().io.parse_single_example(serialized, self.tf_features())
        return self.decode_arrays(ex) if decode_arrays else ex

    def decode_arrays(self, ex: dict) -> dict:
        """A parsed example with its array features (raw bytes) decoded; an absent optional array reads
        as zeros, with ``has_<name>`` False."""
        tf = _tf()
        ex = dict(ex)
        for key, f in self.arrays().items():
            shape, raw = ex[f.shape_from], ex[key]
            dtype = tf.as_dtype(f.array_dtype)

            def decoded(raw=raw, shape=shape, dtype=dtype):
                return tf.reshape(tf.io.decode_raw(raw, dtype, little_endian=True), shape)

            if f.default is None:
                ex[key] = decoded()
            else:
                present = tf.strings.length(raw) > 0
                ex[key] = tf.cond(present, decoded, lambda shape=shape, dtype=dtype: tf.zeros(shape, dtype))
                ex[f"has_{key}"] = present
        return ex


def _np_dtype(dtype: DType):
    return {"int64": np.int64, "float32": np.float32, "bytes": object}[dtype]


# -------------------------------------------------------------------------------------------------
# spec.json: the specs of an output folder's record files
# -------------------------------------------------------------------------------------------------


def write_spec(directory: str, specs: Mapping[str, FeatureSpec]) -> str:
    """Writes ``DIRECTORY/spec.json``: for each shard prefix (``train``, ``volumes``...) its spec."""
    from apache_beam.io.filesystems import FileSystems

    path = f"{str(directory).rstrip('/')}/{SPEC_FILE}"
    body = {
        "format": "headrace.feature_spec/1",
        "records": {p: s.to_json() for p, s in sorted(specs.items())},
    }
    with FileSystems.create(path) as f:
        f.write((json.dumps(body, indent=2) + "\n").encode())
    return path


def read_specs(directory: str) -> dict[str, FeatureSpec]:
    """The specs of ``DIRECTORY/spec.json`` by shard prefix; InputError when there is none."""
    tf = _tf()
    path = f"{str(directory).rstrip('/')}/{SPEC_FILE}"
    if not tf.io.gfile.exists(path):
        raise InputError(f"{directory}: no {SPEC_FILE} (not a headrace output, or one written before specs)")
    try:
        body = json.loads(tf.io.gfile.GFile(path).read())
        return {p: FeatureSpec.from_json(s) for p, s in body["records"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: not a feature spec file ({exc})") from None


def read_spec(directory: str, prefix: str, expected: FeatureSpec | None = None) -> FeatureSpec:
    """The spec of the `prefix` records of an output. With `expected` (the reader's own spec), an output
    written with another spec is refused, naming the features that differ."""
    specs = read_specs(directory)
    if prefix not in specs:
        raise InputError(
            f"{directory}/{SPEC_FILE}: no {prefix!r} records (it has {', '.join(sorted(specs))})"
        )
    spec = specs[prefix]
    if expected is not None and spec != expected:
        ours, theirs = expected.to_json()["features"], spec.to_json()["features"]
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise InputError(
            f"{directory}: its {prefix!r} records were written with spec {spec.name!r} differing from this "
            f"reader's in {', '.join(differ)}; re-run the pipeline that wrote it"
        )
    return spec
