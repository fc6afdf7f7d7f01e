"""Readers of sharded TFRecords: tf.data pipelines parsed by a record's spec, and numpy for small outputs.

`tfrecord_dataset` follows the tf.data performance guide: files interleaved in parallel, batches parsed
vectorised (`tf.io.parse_example` on a batch is several times faster than per example), and prefetch.
`output_dataset` is what the pipelines' ``dataset(out, split)`` readers are built on: it reads the
output's ``spec.json`` and refuses an output whose records were written with another spec.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from headrace.core.errors import InputError
from headrace.transforms.tfrecord.spec import FeatureSpec, read_spec

__all__ = ["list_shards", "output_dataset", "read_examples", "tfrecord_dataset"]


def _tf():
    # TensorFlow is imported on first use: Beam workers that only run non-TF steps never pay for it.
    import tensorflow as tf

    return tf


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
    block_length: int = 64,
    deterministic: bool | None = None,
    prefetch: bool = True,
    share=None,
):
    """A tf.data pipeline over the shards: parallel interleave, shuffle, batched parsing, prefetch.

    Yields dicts of batched tensors (RaggedTensor for variable-length features). Without `shuffle` the
    order is deterministic (shards in name order, interleaved round-robin); with it, pass `seed` for a
    reproducible order. `share` (a `headrace.core.cluster.Share`) reads only this client's input streams
    and yields its part of every global batch (whole batches only).
    """
    tf = _tf()
    files = list_shards(file_pattern)
    compression = _compression_of(files)
    autotune = tf.data.AUTOTUNE
    if deterministic is None:
        deterministic = not shuffle or seed is not None
    if share is not None:
        from headrace.core import cluster

        # This client's input streams (`headrace.core.cluster.Share`): each over its own files, with its
        # own seed and its part of the batch; a batch is their parts concatenated in stream order.
        groups = share.files(files, str(file_pattern))
        part = share.batch(batch_size)
        streams = [
            _records(tf, group, compression, shuffle, shuffle_buffer, cluster.seed_of(seed, r), repeat,
                     cycle_length, block_length, deterministic).batch(part, drop_remainder=True)
            for r, group in zip(share.readers, groups)
        ]  # fmt: skip
        if len(streams) == 1:
            ds = streams[0]
        else:
            ds = tf.data.Dataset.zip(tuple(streams)).map(lambda *parts: tf.concat(parts, axis=0))
        ds = ds.map(spec.parse_batch, num_parallel_calls=autotune, deterministic=deterministic)
        return ds.prefetch(autotune) if prefetch else ds
    ds = _records(
        tf,
        files,
        compression,
        shuffle,
        shuffle_buffer,
        seed,
        repeat,
        cycle_length,
        block_length,
        deterministic,
    )
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(spec.parse_batch, num_parallel_calls=autotune, deterministic=deterministic)
    if prefetch:
        ds = ds.prefetch(autotune)
    return ds


def _records(
    tf, files, compression, shuffle, shuffle_buffer, seed, repeat, cycle_length, block_length, deterministic
):
    """The serialized records of `files`: interleaved, repeated and shuffled as asked."""
    autotune = tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    # block_length: 64 consecutive records from a file before moving to the next. Round-robin per
    # record (1) made the interleave itself the bottleneck: 123k vs 355k CTR examples/s, measured on
    # this 2-core machine (bench/ctr_train.py); the shuffle buffer mixes the blocks anyway.
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=compression, buffer_size=1 << 20),
        cycle_length=min(len(files), cycle_length or 8),
        block_length=block_length,
        num_parallel_calls=autotune,
        deterministic=deterministic,
    )
    if repeat:
        ds = ds.repeat()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return ds


def read_examples(
    file_pattern: str | Sequence[str], spec: FeatureSpec, *, decode_arrays: bool = True
) -> Iterable[dict[str, np.ndarray]]:
    """Every record in the shards, one at a time, decoded to numpy (for tests and small outputs)."""
    tf = _tf()
    files = list_shards(file_pattern)
    compression = _compression_of(files)
    for f in files:
        for serialized in tf.data.TFRecordDataset(f, compression_type=compression).as_numpy_iterator():
            yield spec.decode(serialized, decode_arrays=decode_arrays)


def output_dataset(out: str, prefix: str, batch_size: int, expected: FeatureSpec | None = None, **kwargs):
    """Batches of ``OUT/PREFIX-*.tfrecord*`` parsed by the spec the output declares in its spec.json
    (which must equal `expected` when given); keyword arguments go to `tfrecord_dataset`."""
    out = str(out).rstrip("/")
    spec = read_spec(out, prefix, expected)
    return tfrecord_dataset(f"{out}/{prefix}-*.tfrecord*", spec, batch_size, **kwargs)
