"""Kafka from Python with tfio's ops (its bundled librdkafka): a reader by explicit offsets, a producer.

`PartitionReader` reads one partition of a topic by offsets, so that a consumer can keep its read
position as state of its own (the online trainer saves it in the checkpoint with the model). tfio's
KafkaGroupIODataset was the first choice for that and does not fit: it yields neither offsets nor
partitions, and librdkafka's auto-commit commits what it has fetched (prefetched batches included) every
5 s, so after a SIGKILL the committed position runs ahead of the last checkpoint.

`KafkaProducer` sends messages to topics (the replay producer, tests).

Both are shared resources of tfio's op kernels, which are cached by their attributes: each gets a shared
name of its own (per partition, per topic), or every reader (or producer) in a process would be one
resource, re-initialised by each.
"""

from __future__ import annotations

import itertools

import tensorflow as tf

__all__ = ["KafkaProducer", "PartitionReader"]


class PartitionReader:
    """One partition of a topic, read by offsets (tfio's KafkaReadable ops)."""

    def __init__(self, bootstrap: str, topic: str, partition: int):
        from tensorflow_io.python.ops import core_ops

        self._ops = core_ops
        self.topic, self.partition = topic, partition
        # A shared name per partition: tfio's kernels are cached by attributes, so without one all readers
        # in a process would be the same resource, re-initialised by each.
        self._resource = core_ops.io_kafka_readable_init(
            topic,
            partition,
            offset=0,
            metadata=[f"bootstrap.servers={bootstrap}", "fetch.wait.max.ms=20"],
            shared_name=f"headrace-reader-{topic}-{partition}",
        )

    def end(self) -> int:
        """The partition's end offset (0 while it is empty: tfio's probe of the tail times out)."""
        try:
            _, stop = self._ops.io_kafka_readable_spec(self._resource, 0, -1)
        except tf.errors.InternalError:
            return 0
        return int(stop)

    def read(self, start: int, stop: int) -> list[bytes]:
        """Messages at offsets [start, stop)."""
        return [message for _, message in self.read_keyed(start, stop)]

    def read_keyed(self, start: int, stop: int) -> list[tuple[bytes, bytes]]:
        """(key, message) at offsets [start, stop). tfio returns nothing for a one-message range, so that
        case re-reads the message before and drops it (a lone message at offset 0 waits for a second)."""
        if stop <= start:
            return []
        first = start - 1 if stop - start == 1 else start
        if first < 0:
            return []
        messages, keys = self._ops.io_kafka_readable_read(self._resource, first, stop)
        return list(zip(keys.numpy(), messages.numpy(), strict=True))[start - first :]


class KafkaProducer:
    """Messages to Kafka topics with tfio's producer (librdkafka); no keys.

    One producer resource per topic, each under its own shared name: tfio's op kernels are cached by
    their attributes, so without one every KafkaOutputSequence in a process is the same resource, and the
    second topic's sequence silently takes over the first's (seen: impressions landing on the actions
    topic)."""

    def __init__(self, bootstrap: str, linger_ms: int = 5):
        self._metadata = [f"bootstrap.servers={bootstrap}", f"linger.ms={linger_ms}"]
        self._topics: dict[str, tuple[object, itertools.count]] = {}

    def send(self, topic: str, message: str | bytes) -> None:
        from tensorflow_io.python.ops import core_ops

        if topic not in self._topics:
            resource = core_ops.io_kafka_output_sequence(
                topic=topic, metadata=self._metadata, shared_name=f"headrace-producer-{topic}"
            )
            self._topics[topic] = (resource, itertools.count())
        resource, index = self._topics[topic]
        core_ops.io_kafka_output_sequence_set_item(resource, next(index), message)

    def flush(self) -> None:
        from tensorflow_io.python.ops import core_ops

        for resource, _ in self._topics.values():
            core_ops.io_kafka_output_sequence_flush(resource)
