"""Sharded TFRecords of `tf.train.Example`: one feature spec gives the Beam writers, the tf.data readers
and the spec.json of every output folder.

* `spec`: `Feature`, `FeatureSpec` (encode, decode, parse), spec.json (`write_spec`, `read_spec`);
* `wire`: the Example wire format written directly, batched (`encode_fixed`) or streamed
  (`example_chunks`, `write_record_chunks`);
* `sinks`: Beam writers (`WriteTFRecordShards`, `WriteSortedShards`, `WriteSerializedShards`, `ConcatShards`, `WriteSpec`);
* `readers`: `tfrecord_dataset`, `output_dataset`, `read_examples`, `list_shards`.
"""

from headrace.transforms.tfrecord.readers import list_shards, output_dataset, read_examples, tfrecord_dataset
from headrace.transforms.tfrecord.sinks import (
    ConcatShards,
    WriteSerializedShards,
    WriteSortedShards,
    WriteSpec,
    WriteTFRecordShards,
)
from headrace.transforms.tfrecord.spec import (
    SPEC_FILE,
    Feature,
    FeatureSpec,
    SpecError,
    read_spec,
    read_specs,
    write_spec,
)
from headrace.transforms.tfrecord.wire import RecordBatch, encode_fixed, example_chunks, write_record_chunks

__all__ = [
    "SPEC_FILE",
    "ConcatShards",
    "Feature",
    "FeatureSpec",
    "RecordBatch",
    "SpecError",
    "WriteSerializedShards",
    "WriteSortedShards",
    "WriteSpec",
    "WriteTFRecordShards",
    "encode_fixed",
    "example_chunks",
    "list_shards",
    "output_dataset",
    "read_examples",
    "read_spec",
    "read_specs",
    "tfrecord_dataset",
    "write_record_chunks",
    "write_spec",
]
