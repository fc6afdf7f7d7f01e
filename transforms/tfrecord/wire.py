"""The tf.train.Example wire format written directly: vectorised for batches, streamed for large arrays.

A tf.train.Example is protobuf: Example{1: Features{1: repeated MapEntry{1: key, 2: Feature}}}, with
Feature{1: BytesList{1: repeated bytes} | 2: FloatList{1: packed float} | 3: Int64List{1: packed varint}}.

* `encode_fixed` writes that format for a whole batch of fixed-shape records with numpy (a `RecordBatch`:
  one blob, cheap to move through a runner): ~2 us per Criteo record against ~45 us for protobuf objects.
* `example_chunks` gives one record as byte chunks whose large values are memoryviews of their arrays, and
  `write_record_chunks` frames them as a TFRecord record: a 512 MB volume is written without the two or
  three copies building and serializing a proto makes.

Both check values against the `FeatureSpec` as `FeatureSpec.encode` does, and parse exactly as the proto
would (tests check them against `tf.io.parse_example`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from headrace.transforms.tfrecord.spec import FeatureSpec, SpecError

__all__ = ["RecordBatch", "encode_fixed", "example_chunks", "write_record_chunks"]


@dataclasses.dataclass(frozen=True)
class RecordBatch:
    """Serialized records back to back: record i is blob[offsets[i]:offsets[i + 1]].

    (A dataclass, not a NamedTuple: Beam's coder would encode a tuple subclass by iterating it.)"""

    blob: bytes
    offsets: np.ndarray  # int64 [n + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __iter__(self):
        blob, off = self.blob, self.offsets
        for i in range(len(off) - 1):
            yield blob[off[i] : off[i + 1]]

    def take(self, rows: np.ndarray) -> RecordBatch:
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        src = np.frombuffer(self.blob, dtype=np.uint8)
        out = src[_ranges(starts, lengths)] if len(rows) else np.zeros(0, np.uint8)
        return RecordBatch(out.tobytes(), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges: starts[i] .. starts[i] + lengths[i] - 1 for every i."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first, lengths) + np.arange(total)


def _varint_len(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.uint64)
    n = np.ones(v.shape, dtype=np.int64)
    for k in range(1, 10):
        n += v >= np.uint64(1 << (7 * k))
    return n


class _Cursor:
    """Per-record write positions into one output buffer."""

    def __init__(self, buf: np.ndarray, starts: np.ndarray):
        self.buf, self.pos = buf, starts.copy()

    def byte(self, b: int) -> None:
        self.buf[self.pos] = b
        self.pos += 1

    def const(self, data: bytes) -> None:
        arr = np.frombuffer(data, dtype=np.uint8)
        self.buf[self.pos[:, None] + np.arange(len(arr))] = arr
        self.pos += len(arr)

    def varint(self, values: np.ndarray, lengths: np.ndarray | None = None) -> None:
        v = values.astype(np.int64).view(np.uint64)
        lengths = _varint_len(v) if lengths is None else lengths
        for j in range(int(lengths.max()) if len(lengths) else 0):
            rows = lengths > j
            chunk = ((v[rows] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
            chunk |= np.where(lengths[rows] > j + 1, 0x80, 0).astype(np.uint8)
            self.buf[self.pos[rows] + j] = chunk
        self.pos += lengths

    def raw(self, data: np.ndarray) -> None:
        """Copies rows of a [n, w] uint8 matrix."""
        w = data.shape[1]
        self.buf[self.pos[:, None] + np.arange(w)] = data
        self.pos += w

    def strings(self, offsets: np.ndarray, data: np.ndarray) -> None:
        """Copies string i = data[offsets[i]:offsets[i+1]] at each record's cursor."""
        lengths = np.diff(offsets)
        self.buf[_ranges(self.pos, lengths)] = data[_ranges(offsets[:-1], lengths)]
        self.pos += lengths


def _arrow_strings(values) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [n+1] from 0, data uint8) of an Arrow string/binary array."""
    import pyarrow as pa

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(values, pa.binary())
    if pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type):
        values = values.cast(pa.binary())
    n = len(values)
    offsets = np.frombuffer(
        values.buffers()[1], dtype=np.int32, count=n + 1, offset=values.offset * 4
    ).astype(np.int64)
    base = offsets[0]
    data_buf = values.buffers()[2]
    data = (
        np.frombuffer(data_buf, dtype=np.uint8, count=int(offsets[-1] - base), offset=int(base))
        if data_buf is not None and offsets[-1] > base
        else np.zeros(0, dtype=np.uint8)
    )
    return offsets - base, data


def encode_fixed(spec: FeatureSpec, columns: Mapping[str, Any], n: int) -> RecordBatch:
    """Serializes `n` records of a spec whose features all have fixed shapes, as one RecordBatch.

    Numeric features: arrays [n, *shape]. Bytes features: a list of `size` Arrow string/binary arrays
    of length n (one per position of the feature's vector; one array for a scalar).
    """
    variable = [key for key, f in spec.features.items() if f.shape is None]
    if variable:
        raise SpecError(f"{spec.name}: encode_fixed needs fixed shapes; {variable} have variable length")
    missing = [key for key in spec.features if key not in columns]
    if missing:
        raise SpecError(f"{spec.name}: columns {missing} are missing")
    plans = []
    for key, f in spec.features.items():
        k = key.encode()
        if len(k) > 127:
            raise SpecError(f"{spec.name}: feature name {key!r} too long")
        m = f.size
        if f.dtype == "bytes":
            cols = columns[key]
            cols = [cols] if m == 1 and not isinstance(cols, list | tuple) else list(cols)
            if len(cols) != m:
                raise SpecError(f"{spec.name}: {key!r} needs {m} string columns, got {len(cols)}")
            strings = [_arrow_strings(c) for c in cols]
            if any(len(o) != n + 1 for o, _ in strings):
                raise SpecError(f"{spec.name}: a column of {key!r} does not have {n} values")
            lens = [np.diff(o) for o, _ in strings]
            list_len = sum(1 + _varint_len(length) + length for length in lens)
            plans.append((key, k, "bytes", strings, lens, list_len, None))
            body = list_len
        elif f.dtype == "int64":
            v = np.asarray(columns[key], dtype=np.int64).reshape(n, m)
            vl = _varint_len(v.view(np.uint64))
            packed = vl.sum(axis=1)
            list_len = 1 + _varint_len(packed) + packed
            plans.append((key, k, "int64", v, vl, list_len, packed))
            body = list_len
        else:
            v = np.ascontiguousarray(np.asarray(columns[key], dtype="<f4").reshape(n, m))
            packed = np.full(n, 4 * m, dtype=np.int64)
            list_len = 1 + _varint_len(packed) + packed
            plans.append((key, k, "float32", v.view(np.uint8).reshape(n, 4 * m), None, list_len, packed))
            body = list_len
        feature_len = 1 + _varint_len(body) + body
        entry_len = 2 + len(k) + 1 + _varint_len(feature_len) + feature_len
        plans[-1] = (*plans[-1], feature_len, entry_len)
    features_len = sum(1 + _varint_len(p[-1]) + p[-1] for p in plans)
    record_len = 1 + _varint_len(features_len) + features_len
    offsets = np.concatenate([[0], np.cumsum(record_len)]).astype(np.int64)
    buf = np.zeros(int(offsets[-1]), dtype=np.uint8)
    c = _Cursor(buf, offsets[:-1])
    c.byte(0x0A)  # Example.features
    c.varint(features_len)
    for _, k, kind, values, extra, list_len, packed, feature_len, entry_len in plans:
        c.byte(0x0A)  # Features.feature (a map entry)
        c.varint(entry_len)
        c.const(b"\x0a" + bytes([len(k)]) + k + b"\x12")  # entry key, then entry value tag
        c.varint(feature_len)
        if kind == "bytes":
            c.byte(0x0A)  # Feature.bytes_list
            c.varint(list_len)
            for (off, data), length in zip(values, extra):
                c.byte(0x0A)  # BytesList.value
                c.varint(length)
                c.strings(off, data)
        elif kind == "int64":
            c.byte(0x1A)  # Feature.int64_list
            c.varint(list_len)
            c.byte(0x0A)  # Int64List.value, packed
            c.varint(packed)
            for j in range(values.shape[1]):
                c.varint(values[:, j], extra[:, j])
        else:
            c.byte(0x12)  # Feature.float_list
            c.varint(list_len)
            c.byte(0x0A)  # FloatList.value, packed
            c.varint(packed)
            c.raw(values)
    assert np.array_equal(c.pos, offsets[1:]), "record lengths and writes disagree"
    return RecordBatch(buf.tobytes(), offsets)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(tag: int, payload_len: int) -> bytes:
    return bytes([tag]) + _varint(payload_len)


def _nbytes(chunk) -> int:
    return chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)


def example_chunks(spec: FeatureSpec, record: Mapping[str, Any]) -> list:
    """A `tf.train.Example` of `record` as a list of byte chunks, large values kept as memoryviews.

    Numeric features are encoded as `FeatureSpec.encode` would; a bytes feature may be given as a
    contiguous numpy array, whose buffer becomes a chunk without a copy. This is how a 512 MB volume is
    written without the two or three copies that building and serializing a proto makes
    (`write_record_chunks` streams the chunks into a TFRecord file). The result parses exactly as
    the proto would (the wire format is the same; tests check it against `tf.io.parse_example`).
    """
    unknown = set(record) - set(spec.features)
    if unknown:
        raise SpecError(f"{spec.name}: unknown features {sorted(unknown)}")
    spec.check_arrays(record)
    entries = []  # (chunks, length) of each map entry
    for key, feature in spec.features.items():
        value = record.get(key)
        if value is None:
            if feature.default is None:
                raise SpecError(f"{spec.name}: feature {key!r} is missing")
            continue
        if feature.dtype == "bytes":
            if isinstance(value, np.ndarray):
                if not value.flags.c_contiguous:
                    raise SpecError(f"{spec.name}: feature {key!r}: array must be C-contiguous")
                items = [memoryview(value).cast("B").toreadonly()]
            else:
                items = [memoryview(v) for v in spec._values(key, feature, value)]
            inner = []
            for item in items:
                inner += [_len_field(0x0A, item.nbytes), item]
            tag = 0x0A  # Feature.bytes_list
        elif feature.dtype == "float32":
            values = spec._values(key, feature, value).astype("<f4")
            inner = [_len_field(0x0A, values.nbytes), values.tobytes()]  # packed
            tag = 0x12  # Feature.float_list
        else:
            payload = b"".join(_varint(int(v)) for v in spec._values(key, feature, value))
            inner = [_len_field(0x0A, len(payload)), payload]
            tag = 0x1A  # Feature.int64_list
        list_len = sum(_nbytes(c) for c in inner)
        feature_chunks = [_len_field(tag, list_len), *inner]
        feature_len = sum(_nbytes(c) for c in feature_chunks)
        key_bytes = key.encode()
        entry = [_len_field(0x0A, len(key_bytes)), key_bytes, _len_field(0x12, feature_len), *feature_chunks]
        entry_len = sum(_nbytes(c) for c in entry)
        entries.append([_len_field(0x0A, entry_len), *entry])  # Features.feature (map entry)
    features = [c for entry in entries for c in entry]
    return [_len_field(0x0A, sum(_nbytes(c) for c in features)), *features]  # Example.features


_CRC_PIECE = 4 << 20


def _masked_crc(crc: int) -> bytes:
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    return masked.to_bytes(4, "little")


def write_record_chunks(fileobj, chunks: Sequence) -> int:
    """Appends one TFRecord record whose payload is the concatenation of `chunks`; returns its bytes.

    The TFRecord framing: length (uint64 LE), masked CRC32C of the length, payload, masked CRC32C of the
    payload. Writing record by record to a plain file object lets Beam's FileSystems (local, GCS) hold
    the output, and lets record files be concatenated (a TFRecord file is its records back to back).
    """
    import google_crc32c

    length = sum(_nbytes(c) for c in chunks)
    header = length.to_bytes(8, "little")
    fileobj.write(header)
    fileobj.write(_masked_crc(google_crc32c.value(header)))
    crc = 0
    for chunk in chunks:
        if isinstance(chunk, bytes):
            crc = google_crc32c.extend(crc, chunk)
        else:  # its C extension takes bytes only: checksum a large buffer 4 MiB at a time
            for i in range(0, chunk.nbytes, _CRC_PIECE):
                crc = google_crc32c.extend(crc, bytes(chunk[i : i + _CRC_PIECE]))
        fileobj.write(chunk)
    fileobj.write(_masked_crc(crc))
    return length + 16
