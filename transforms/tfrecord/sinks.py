"""Beam sinks of sharded TFRecords, and the spec.json every record-writing pipeline leaves beside them.

* `WriteTFRecordShards`: records (dicts matching a `FeatureSpec`) -> ``PREFIX-SSSSS-of-NNNNN.tfrecord``,
  encoded by the spec, through Beam's file sink; `WriteSortedShards`: the same, byte-identical on every
  runner (shard by a hash of the record, records in byte order);
* `WriteSerializedShards`: ``(shard, records)`` batches already serialized (a `RecordBatch` or a list),
  one Beam element per batch instead of one per record; every shard is written, empty or not;
* `ConcatShards`: ``(shard, part file)`` pairs -> one file per shard, the parts (each whole TFRecord
  records) concatenated, for records too large to travel through a runner (volumes);
* `WriteSpec`: the specs of the output's record files as ``spec.json`` (`headrace.transforms.tfrecord.spec`).
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections.abc import Mapping
from typing import Literal

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from headrace.transforms.tfrecord.spec import FeatureSpec, write_spec

__all__ = ["ConcatShards", "WriteSerializedShards", "WriteSortedShards", "WriteSpec", "WriteTFRecordShards"]


def _tf():
    import tensorflow as tf

    return tf


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
    the run stages the whole output directory (`headrace.core.outputs.staged_output`), so a failed write leaves
    no shard behind. Returns the written paths.
    """
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1 (a fixed count keeps the output layout reproducible)")
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


def _shard_of(record: bytes, num_shards: int) -> tuple[int, bytes]:
    return zlib.crc32(record) % num_shards, record


def _sorted_shard(element):
    shard, records = element
    return shard, [sorted(r for r in records if r)]


@beam.ptransform_fn
@beam.typehints.with_input_types(dict)
@beam.typehints.with_output_types(str)
def WriteSortedShards(pcoll, spec: FeatureSpec, file_path_prefix: str, num_shards: int):
    """`WriteTFRecordShards` with the same files on every runner: each record goes to the shard of a hash
    of its bytes, and a shard's records are written in byte order. A shard is sorted in one worker's
    memory: for outputs of modest shards (crowd task records), not for images or volumes."""
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1 (a fixed count keeps the output layout reproducible)")
    keyed = pcoll | "Encode" >> beam.ParDo(_Encode(spec)) | "Shard" >> beam.Map(_shard_of, num_shards)
    empty = pcoll.pipeline | "AllShards" >> beam.Create([(s, b"") for s in range(num_shards)])
    return (
        (keyed, empty)
        | "WithEmpty" >> beam.Flatten()
        | "ByShard" >> beam.GroupByKey()
        | "Sort" >> beam.Map(_sorted_shard)
        | "Write" >> beam.ParDo(_WriteShard(file_path_prefix, num_shards))
    )


class _WriteShard(beam.DoFn):
    def __init__(self, file_path_prefix: str, num_shards: int):
        self._prefix, self._num_shards = file_path_prefix, num_shards
        self._records = beam.metrics.Metrics.counter("tfrecord", "records_written")

    def process(self, element):
        shard, batches = element
        tf = _tf()
        path = f"{self._prefix}-{shard:05d}-of-{self._num_shards:05d}.tfrecord"
        tmp = f"{path}.tmp-{os.getpid()}"
        tf.io.gfile.makedirs(os.path.dirname(path) or ".")
        n = 0
        with tf.io.TFRecordWriter(tmp) as writer:
            for batch in batches:  # lists of records or RecordBatches
                for record in batch:
                    writer.write(record)
                n += len(batch)
        tf.io.gfile.rename(tmp, path, overwrite=True)
        self._records.inc(n)
        yield path


@beam.ptransform_fn
def WriteSerializedShards(pcoll, file_path_prefix: str, num_shards: int):
    """``(shard, records)`` batches -> ``PREFIX-SSSSS-of-NNNNN.tfrecord``, all shards written.

    `records` is a list of serialized records or a `RecordBatch` (one blob: far cheaper to move
    through a runner than a list of Python bytes objects).

    The batched counterpart of `WriteTFRecordShards`: the caller assigns records to shards (by a hash,
    so that the layout is reproducible) and one Beam element carries a whole batch, instead of one per
    record through the shuffle. Empty shards are written too, so the file set is always complete.
    """
    empty = pcoll.pipeline | "AllShards" >> beam.Create([(s, []) for s in range(num_shards)])
    return (
        (pcoll, empty)
        | "WithEmpty" >> beam.Flatten()
        | "ByShard" >> beam.GroupByKey()
        | "Write" >> beam.ParDo(_WriteShard(file_path_prefix, num_shards))
    )


def _concat(element, prefix: str, shards: int) -> str:
    """Concatenates a shard's part files (each whole TFRecord records) into its final file."""
    shard, parts = element
    path = f"{prefix}-{shard:05d}-of-{shards:05d}.tfrecord"
    with FileSystems.create(path) as out:
        for part in sorted(p for p in parts if p):
            with FileSystems.open(part, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                shutil.copyfileobj(f, out, 8 << 20)
    return path


@beam.ptransform_fn
@beam.typehints.with_input_types(tuple[int, str])
@beam.typehints.with_output_types(str)
def ConcatShards(parts, file_path_prefix: str, num_shards: int, *, all_shards: bool = True):
    """``(shard, part path)`` -> ``PREFIX-SSSSS-of-NNNNN.tfrecord`` with the parts of each shard, in path
    order (so the contents are the same on every runner). With `all_shards`, shards without parts are
    written empty, so the file set is always complete; otherwise only shards with parts exist."""
    if all_shards:
        empty = parts.pipeline | "AllShards" >> beam.Create([(s, "") for s in range(num_shards)])
        parts = (parts, empty) | "WithEmpty" >> beam.Flatten()
    return (
        parts | "ByShard" >> beam.GroupByKey() | "Concat" >> beam.Map(_concat, file_path_prefix, num_shards)
    )


@beam.ptransform_fn
def WriteSpec(pcoll, directory: str, specs: Mapping[str, FeatureSpec] | None = None):
    """``DIRECTORY/spec.json`` from `specs`, when they are known as the pipeline is built (apply it to the
    pipeline), or from the single ``{prefix: FeatureSpec}`` element of `pcoll` (known only at run time)."""
    if specs is not None:
        pcoll = pcoll | "Specs" >> beam.Create([dict(specs)])
    return pcoll | "Write" >> beam.Map(lambda s: write_spec(directory, s))
