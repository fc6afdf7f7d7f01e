"""``headrace train ctr --online``: a CTR trainer that never stops, fed by the examples topic.

    headrace train ctr --online --bootstrap HOST:PORT --examples TOPIC --serving-dir S --output MODEL
        [--sync-every 30] [--dense-sync-every 120] [--checkpoint-every-seconds 60] [--idle-timeout 0]
        [--shuffle-buffer 4096] [--max-wait 10]

A task on the one training loop (`headrace.runners.loop`) whose batches never end:

Reading. Every partition of the topic is read by explicit offsets (`headrace.runners.kafka`); the topic's
partitions are listed again every `partition_refresh` seconds, and a partition added while the trainer
runs is read from its start. The next offset of each partition is trainer state, saved in the same checkpoint as the model and the embedding
table, with the examples read but not yet trained (the shuffle buffer's contents), so a trainer killed at
any point resumes with no example lost and none trained twice beyond the last checkpoint. The output
directory is the trainer's live state: it is not staged, and a restart always resumes from it.

Training. Lines of `EXAMPLE_LINE` (``label <TAB> weight <TAB> 39 raw fields``, the joiner's output)
become ids exactly as serving hashes them and train the batch model's step (`CTRTask`). Batches are drawn
at random from a `ShuffleBuffer` (the join writes runs of one class), and no example waits longer than
`max_wait` seconds. Negatives carry weight 1/R (the joiner's keep rate); the trainer learns the odds of
the sample and the serving copy adds log R to the logit. Malformed lines are counted and skipped, named by
partition and offset.

Serving copies. Every `sync_every` seconds the rows the table touched since the last sync are published
as a new version of the serving copy (`headrace.runners.serving`), every `dense_sync_every` seconds with
the dense weights too; each sync is a line of ``MODEL/syncs.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from headrace.core.errors import ConfigError
from headrace.models.embedding import FIELDS, serving_ids
from headrace.pipelines.ctr_stream import EXAMPLE_LINE
from headrace.runners import loop, stack
from headrace.runners.ctr_task import CTRTask, CTRTrainConfig
from headrace.runners.impression_order import ImpressionOrder
from headrace.runners.kafka import PartitionReader
from headrace.runners.serving import ServingPublisher
from headrace.runners.shuffle_buffer import ShuffleBuffer

__all__ = ["OnlineCTRTask", "parse_examples", "train_online"]

_log = logging.getLogger("headrace.train")

CHECKPOINT_EVERY_SECONDS = 60.0  # --checkpoint-every-seconds 0 means this for a trainer that never ends


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def _parse(lines):
    columns = EXAMPLE_LINE.parse(lines)
    return {f: columns[f] for f in FIELDS}, tf.cast(columns["label"], tf.float32), columns["weight"]


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def _parse_ids(lines):
    fields, labels, weights = _parse(lines)
    return serving_ids(fields), labels, weights


def parse_examples(lines: list[bytes]):
    """Example lines -> (fields dict of 39 [B] strings, labels [B] float32, weights [B] float32)."""
    return _parse(tf.constant(list(lines), tf.string))


class OnlineCTRTask(CTRTask):
    """The CTR step on batches drawn from a Kafka topic (see the module docstring)."""

    staged = False
    eval_every_epoch = False

    def __init__(self, config: CTRTrainConfig):
        super().__init__(config)
        self.name = "ctr online"
        self.stopped = ""
        self.trained_here, self.waited = 0, 0.0

    # -- set-up -----------------------------------------------------------------------------------

    def create_mesh(self):
        mesh = super().create_mesh()
        if mesh is not None and "batch" in mesh.dim_names:
            raise ConfigError("--online trains batches of any size as they come: use a mesh without `batch`")
        return mesh

    def build(self, mesh) -> None:
        super().build(mesh)
        c = self.config
        stack.create_topics(c.bootstrap, [c.examples])
        partitions = self._list_partitions()
        self.readers = [PartitionReader(c.bootstrap, c.examples, p) for p in partitions]
        # Read positions: every example below is trained, rejected, or pending in the shuffle buffer,
        # whose contents are saved alongside (`pending_*`). Reader i reads partition `partition_ids[i]`;
        # partitions added to the topic later are appended (`_refresh_partitions`).
        self.offsets = tf.Variable(
            np.zeros(len(partitions), np.int64), shape=[None], trainable=False, name="offsets"
        )
        self.partition_ids = tf.Variable(
            np.array(partitions, np.int64), shape=[None], trainable=False, name="partition_ids"
        )
        self._listed = time.monotonic()
        self.trained = tf.Variable(np.int64(0), trainable=False, name="examples_trained")
        self.rejected = tf.Variable(np.int64(0), trainable=False, name="examples_rejected")
        self.keep_rate = tf.Variable(1.0, trainable=False, name="negative_keep_rate")
        self.pending = tf.Variable(tf.zeros([0], tf.string), shape=[None], trainable=False, name="pending")
        self.pending_where = tf.Variable(
            tf.zeros([0, 2], tf.int64), shape=[None, 2], trainable=False, name="pending_where"
        )
        self.buffer = ShuffleBuffer(c.batch_size, c.shuffle_buffer, c.max_wait, c.seed)
        # The first example per request id, in impression-time order (`ImpressionOrder`), its state saved
        # with the offsets: request ids remembered, examples held for the join's watermark.
        self.order = ImpressionOrder(c.dedupe_horizon)
        self.order_state = {
            "seen_ids": tf.Variable(tf.zeros([0], tf.string), shape=[None], trainable=False, name="seen_ids"),
            "seen_ms": tf.Variable(tf.zeros([0], tf.int64), shape=[None], trainable=False, name="seen_ms"),
            "held": tf.Variable(tf.zeros([0], tf.string), shape=[None], trainable=False, name="held"),
            "held_where": tf.Variable(
                tf.zeros([0, 3], tf.int64), shape=[None, 3], trainable=False, name="held_where"
            ),
            "watermark": tf.Variable(np.int64(0), trainable=False, name="join_watermark"),
            "duplicates": tf.Variable(np.int64(0), trainable=False, name="duplicates_skipped"),
        }
        self.publisher = ServingPublisher(self, Path(c.serving_dir), c.keep_versions)
        self._last_dense = time.monotonic()

    def checkpoint_groups(self):
        groups = super().checkpoint_groups()
        groups["host"] = {
            **groups["host"],
            "offsets": self.offsets,
            "partition_ids": self.partition_ids,
            "trained": self.trained,
            "rejected": self.rejected,
            "keep_rate": self.keep_rate,
            "pending": self.pending,
            "pending_where": self.pending_where,
            **{f"order_{name}": v for name, v in self.order_state.items()},
        }
        return groups

    def restored(self, fit: loop.Fit) -> None:
        # Readers in the checkpoint's order (its buffer names readers by index), then any partition
        # the topic gained since, from its start.
        c, saved = self.config, [int(p) for p in self.partition_ids.numpy()]
        self.readers = [PartitionReader(c.bootstrap, c.examples, p) for p in saved]
        self._refresh_partitions()
        self.buffer.restore(self.pending.numpy(), self.pending_where.numpy(), time.monotonic())
        self.order.restore(**{name: v.numpy() for name, v in self.order_state.items()})
        _log.info(
            "online: resumed at step %d, %d examples trained, offsets %s, %d pending, %d held",
            fit.step,
            int(self.trained.numpy()),
            self.offsets.numpy().tolist(),
            len(self.buffer),
            len(self.order),
        )

    def checkpoint_seconds(self) -> float:
        return self.config.checkpoint_every_seconds or CHECKPOINT_EVERY_SECONDS

    def before_checkpoint(self, fit: loop.Fit) -> None:
        lines, where = self.buffer.state()
        self.pending.assign(tf.constant(lines, tf.string, shape=[len(lines)]))
        self.pending_where.assign(where)
        for name, value in self.order.state().items():
            if value.dtype == object:
                value = tf.constant(value.tolist(), tf.string, shape=[len(value)])
            self.order_state[name].assign(value)

    # -- the stream -------------------------------------------------------------------------------

    def total_steps(self) -> None:
        return None

    def steps_per_epoch(self) -> None:
        return None

    def rates(self, step: int) -> tuple[float, float, float]:
        c = self.config  # no schedule: a stream has no epochs to warm up over
        return c.learning_rate, c.embedding_learning_rate, c.l2

    def _list_partitions(self) -> list[int]:
        c = self.config
        return sorted(p for (_, p) in stack.end_offsets(c.bootstrap, [c.examples]))

    def _refresh_partitions(self) -> None:
        """Adds a reader (from offset 0) for every partition the topic has gained."""
        self._listed = time.monotonic()
        known = {r.partition for r in self.readers}
        new = [p for p in self._list_partitions() if p not in known]
        if not new:
            return
        c = self.config
        self.readers += [PartitionReader(c.bootstrap, c.examples, p) for p in new]
        self.offsets.assign(np.concatenate([self.offsets.numpy(), np.zeros(len(new), np.int64)]))
        self.partition_ids.assign(np.array([r.partition for r in self.readers], np.int64))
        _log.info("online: %s gained partition(s) %s; reading them from offset 0", c.examples, new)

    def _poll(self) -> int:
        """Reads what is new in every partition into the buffer; returns how many lines."""
        if time.monotonic() - self._listed >= self.config.partition_refresh:
            self._refresh_partitions()
        read, got, now = self.offsets.numpy(), 0, time.monotonic()
        for i, reader in enumerate(self.readers):
            end = reader.end()
            if end > read[i]:
                pairs = reader.read_keyed(int(read[i]), int(min(end, read[i] + self.config.read_chunk)))
                for k, (key, line) in enumerate(pairs):
                    if self.order.offer(key, i, int(read[i]) + k, line):
                        self.buffer.add(i, int(read[i]) + k, line, now)
                read[i] += len(pairs)
                got += len(pairs)
        for i, offset, line in self.order.release():
            self.buffer.add(i, offset, line, now)
        if got:
            self.offsets.assign(read)
        return got

    def _good(self, batch) -> list[bytes]:
        """The batch's well-formed lines; the others are counted and named."""
        bad = [(i, offset, EXAMPLE_LINE.problem(line)) for i, offset, line in batch]
        bad = [b for b in bad if b[2] is not None]
        if bad:
            self.rejected.assign_add(len(bad))
            where = [f"{self.readers[i].partition}@{offset} ({why})" for i, offset, why in bad[:10]]
            _log.warning(
                "online: %d malformed example line(s) skipped in %s[partition@offset]: %s",
                len(bad),
                self.config.examples,
                ", ".join(where) + (" ..." if len(bad) > 10 else ""),
            )
        skip = {(i, offset) for i, offset, _ in bad}
        return [line for i, offset, line in batch if (i, offset) not in skip]

    def batches(self, step: int):
        """Batches of good lines as the buffer allows, None between polls; ends at `max_examples` or
        after `idle_timeout` seconds without data."""
        c = self.config
        last_data = time.monotonic()
        while True:
            polled = time.monotonic()
            got = self._poll()
            now = time.monotonic()
            if got:
                last_data = now
            else:
                self.waited += now - polled
            yielded = False
            while self.buffer.ready(now):
                good = self._good(self.buffer.take(now))
                if good:
                    yield good
                    yielded = True
                now = time.monotonic()
            done = (
                bool(c.max_examples) and int(self.trained.numpy() + self.rejected.numpy()) >= c.max_examples
            )
            quiet = bool(c.idle_timeout) and now - last_data >= c.idle_timeout
            if quiet and len(self.order):  # no watermark will come to let them through: train them now
                for i, offset, line in self.order.release(everything=True):
                    self.buffer.add(i, offset, line, now)
            idle = quiet and not len(self.buffer) and not len(self.order)
            if done or idle:
                self.stopped = "max_examples" if done else "idle"
                return
            if not yielded:
                yield None  # a tick: syncs and checkpoints run while the stream is quiet
            if not got:
                time.sleep(c.poll_interval)
                self.waited += c.poll_interval

    def place(self, lines, step: int):
        # One traced call per batch: ~80 eager ops (splitting, 41 columns, hashing) cost a third of the
        # trainer's time at 1,000 examples/s.
        ids, labels, weights = _parse_ids(tf.constant(lines, tf.string))
        negative = weights.numpy()[labels.numpy() == 0]
        if len(negative):
            self.keep_rate.assign(float(1.0 / negative[-1]))
        return super().place((ids, labels), step)

    def examples(self, lines) -> int:
        return len(lines)

    def after_step(self, fit: loop.Fit, lines, scalars) -> None:
        self.trained.assign_add(len(lines))
        self.trained_here += len(lines)
        scalars["trained"] = float(self.trained.numpy())
        super().after_step(fit, lines, scalars)

    # -- serving copies ---------------------------------------------------------------------------

    def sync(self, fit: loop.Fit, dense: bool | None = None) -> None:
        """Publishes a serving copy of what is trained (the dense weights too every `dense_sync_every`)."""
        c, now = self.config, time.monotonic()
        if dense is None:
            dense = now - self._last_dense >= c.dense_sync_every
        if dense:
            self._last_dense = now
        info = self.publisher.apply_delta(fit.step, dense)
        losses = fit.history.get("loss", [])
        info.update(
            step=fit.step,
            examples_trained=int(self.trained.numpy()),
            offsets=self.offsets.numpy().tolist(),
            trained_below=self.order.lowest(self.buffer.lowest(self.offsets.numpy())).tolist(),
            pending=len(self.buffer),
            held=len(self.order),
            join_watermark_ms=self.order.watermark,
            loss=float(np.mean(losses[-50:])) if losses else None,
        )
        version = self.publisher.publish(info, math.log(float(self.keep_rate.numpy())))
        with open(fit.directory / "syncs.jsonl", "a") as f:
            f.write(json.dumps({**info, "version": version, "unix": time.time()}) + "\n")
        fit.summaries.scalars(
            fit.step, {"serving/version": version, "serving/rows_updated": info["rows_updated"]}
        )

    def periodic(self):
        return [(self.config.sync_every, self.sync)]

    def finish(self, fit: loop.Fit) -> None:
        self.sync(fit, dense=True)

    # -- outputs ----------------------------------------------------------------------------------

    def evaluate(self, fit: loop.Fit) -> dict:
        return {}  # the serving copies are evaluated by their readers

    def export(self, directory: Path) -> None:
        pass  # the serving copies are the export

    def metrics(self, result: loop.FitResult) -> dict:
        busy = result.train_seconds - self.waited
        return {
            "examples_trained": int(self.trained.numpy()),
            "examples_rejected": int(self.rejected.numpy()),
            "offsets": {str(r.partition): int(o) for r, o in zip(self.readers, self.offsets.numpy())},
            "serving_version": self.publisher.version,
            "negative_keep_rate": float(self.keep_rate.numpy()),
            "stopped": self.stopped,
            "duplicates_skipped": self.order.duplicates,
            "held": len(self.order),
            "join_watermark_ms": self.order.watermark,
            # What this run's work sustains: reading, training, publishing and checkpointing, not the waits
            # for data (nor for the shuffle buffer to fill).
            "examples_per_sec": self.trained_here / busy if busy > 0 else 0.0,
            **self.table.counters(),
        }


def _validate(config: CTRTrainConfig) -> None:
    for name in ("bootstrap", "examples", "serving_dir", "output"):
        if not getattr(config, name):
            raise ConfigError(f"--{name.replace('_', '-')} is required with --online")
    if config.feature_selection != "none":
        raise ConfigError("--feature-selection applies to batch training, not --online")
    if config.sync_every <= 0 or config.dense_sync_every < config.sync_every:
        raise ConfigError("--sync-every must be > 0 and --dense-sync-every >= --sync-every")


def train_online(config: CTRTrainConfig) -> dict:
    """Trains from the topic until `max_examples` are trained or the topic is idle for `idle_timeout`
    seconds (0: forever); returns the run's counters (also in OUTPUT/metrics.json)."""
    _validate(config)
    return loop.fit(OnlineCTRTask(config))
