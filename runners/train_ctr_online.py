"""``headrace train ctr --online``: a CTR trainer that never stops, fed by the examples topic.

    headrace train ctr --online --bootstrap HOST:PORT --examples TOPIC --serving-dir S --output MODEL
        [--sync-every 30] [--dense-sync-every 120] [--checkpoint-every-seconds 60] [--idle-timeout 0]
        [--shuffle-buffer 4096] [--max-wait 10]

Reading. Every partition of the topic is read by explicit offsets with tfio's Kafka ops (its bundled
librdkafka): the next offset of each partition is trainer state, saved in the same checkpoint as the
model and the embedding table (with the examples read but not yet trained), and a restart reads from
exactly there. tfio's KafkaGroupIODataset was the
first choice and does not fit: it yields neither offsets nor partitions, and librdkafka's auto-commit
commits what it has fetched (prefetched batches included) every 5 s, so after a SIGKILL the committed
position runs ahead of the last checkpoint and those examples would be lost. With offsets in the
checkpoint, a trainer killed at any point resumes with no example lost and none trained twice beyond the
last checkpoint.

Training. Lines ``label <TAB> weight <TAB> 39 raw fields`` (the joiner's output) become ids exactly as
serving hashes them, and train the batch CTR model (`CTRTrainer`) step by step. Batches are drawn at
random from a shuffle buffer (`ShuffleBuffer`: the join writes runs of one class), and no example waits
longer than `max_wait` seconds. Negatives carry weight 1/R (the joiner's keep rate); the trainer learns
the odds of the sample and the serving copy adds log R to the logit.

Serving copy. Every `sync_every` seconds the rows the table touched since the last sync (and the ids it
expired) are applied to a host copy of the sparse parameters; every `dense_sync_every` seconds the dense
weights too. The copy is written as a SavedModel ``S/<version>/`` (the batch model's ``serving_default``:
39 raw fields in, ``probability`` out, plus ``sync.json``), then ``S/LATEST`` is replaced atomically, so a
reader never sees half a model. `ServingCopy` is the reader side: it reloads when LATEST changes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from headrace.models.embedding import serving_ids
from headrace.runners import config as config_lib
from headrace.runners import mesh as mesh_lib
from headrace.runners import stack
from headrace.runners.errors import ConfigError, HeadraceError
from headrace.runners.train_ctr import (
    FIELDS,
    CTRTrainer,
    PairedCheckpoint,
    ServingCTR,
    resolve_mesh,
    save_serving,
)
from headrace.runners.training import Progress, Summaries, write_json

__all__ = [
    "PartitionReader",
    "ServingCopy",
    "ServingPublisher",
    "ShuffleBuffer",
    "parse_examples",
    "train_online",
]

_log = logging.getLogger("headrace.train")


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


def parse_examples(lines: list[bytes]):
    """Example lines -> (fields dict of 39 [B] strings, labels [B] float32, weights [B] float32)."""
    parts = tf.strings.split(tf.constant(lines), "\t").to_tensor(default_value="", shape=[len(lines), 41])
    labels = tf.strings.to_number(parts[:, 0], tf.float32)
    weights = tf.strings.to_number(parts[:, 1], tf.float32)
    fields = {name: parts[:, 2 + k] for k, name in enumerate(FIELDS)}
    return fields, labels, weights


def _valid(line: bytes) -> bool:
    parts = line.split(b"\t")
    if len(parts) != 41 or parts[0] not in (b"0", b"1"):
        return False
    try:
        return float(parts[1]) > 0
    except ValueError:
        return False


class ShuffleBuffer:
    """Examples read but not yet trained, drawn from at random: tf.data's shuffle, for a stream.

    A joined stream is far from shuffled: positives leave the join at the click, negatives when the
    watermark passes their window, so the topic holds runs of one class, hundreds long while the join
    lags. Online SGD on such runs swings from one class to the other. The buffer holds up to `size`
    examples and trains a batch drawn uniformly from it once it is full; an example that has waited
    `max_wait` seconds goes into the next batch whatever the buffer holds (a slow or stopped stream is
    still trained, within that bound). With `size` 0 batches are trained in arrival order.

    Its contents are trainer state like the read offsets, saved in the same checkpoint (`state` /
    `restore`), so a restart resumes with the same examples pending: none lost, none trained twice."""

    def __init__(self, batch_size: int, size: int, max_wait: float, seed: int = 0):
        self.batch_size, self.capacity, self.max_wait = batch_size, max(size, batch_size), max_wait
        self.shuffle = size > 0
        self._items: list[tuple[int, int, bytes, float]] = []  # (partition index, offset, line, arrival)
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, partition: int, offset: int, line: bytes, now: float) -> None:
        self._items.append((partition, offset, line, now))

    def _overdue(self, now: float) -> int:
        """How many examples have waited `max_wait` (they are the first ones: kept in arrival order)."""
        n = 0
        while n < len(self._items) and now - self._items[n][3] >= self.max_wait:
            n += 1
        return n

    def ready(self, now: float) -> bool:
        return len(self._items) >= self.capacity or bool(self._items and self._overdue(now))

    def take(self, now: float) -> list[tuple[int, int, bytes]]:
        """One batch drawn at random, from the overdue examples first when there are any (without a
        shuffle, the first ones)."""
        n, overdue = len(self._items), self._overdue(now)
        if not self.shuffle:
            drawn = np.arange(min(self.batch_size, n))
        elif overdue >= self.batch_size:
            drawn = self._rng.choice(overdue, self.batch_size, replace=False)
        else:
            k = min(self.batch_size - overdue, n - overdue)
            drawn = np.concatenate(
                [np.arange(overdue), overdue + self._rng.choice(n - overdue, k, replace=False)]
            )
        chosen = set(drawn.tolist())
        batch = [self._items[i][:3] for i in sorted(chosen)]
        self._items = [item for i, item in enumerate(self._items) if i not in chosen]
        return batch

    def lowest(self, read) -> np.ndarray:
        """Per partition, the lowest offset still pending (`read`, the next to read, where none is):
        every example below it has been trained or rejected."""
        low = np.asarray(read, np.int64).copy()
        for i, offset, _, _ in self._items:
            low[i] = min(low[i], offset)
        return low

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """(lines [N] bytes, where [N, 2] partition index and offset), for the checkpoint."""
        lines = np.array([item[2] for item in self._items], dtype=object)
        where = np.array([item[:2] for item in self._items], np.int64).reshape(-1, 2)
        return lines, where

    def restore(self, lines, where, now: float) -> None:
        self._items = [(int(i), int(o), bytes(line), now) for line, (i, o) in zip(lines, where, strict=True)]


class ServingPublisher:
    """The serving copy's host state, updated from the trainer by deltas and published as versions."""

    def __init__(self, trainer, directory: Path, keep_versions: int = 3):
        self.trainer = trainer
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep_versions = keep_versions
        dim = trainer.config.embedding_dim
        self._slot: dict[int, int] = {}  # id -> row of the arrays below
        self._E = np.zeros((1024, dim), np.float32)
        self._w = np.zeros((1024, 1), np.float32)
        self._free: list[int] = []
        self._dense = [mesh_lib.to_numpy(v) for v in trainer.model.weights]
        self.synced_clock = -1  # rows used after this table clock are not in the copy yet
        self.version = self._latest_version()

    def _latest_version(self) -> int:
        latest = self.dir / "LATEST"
        return int(latest.read_text().strip()) if latest.is_file() else 0

    def _put(self, ids: np.ndarray, E: np.ndarray, w: np.ndarray) -> None:
        for i, key in enumerate(ids.tolist()):
            slot = self._slot.get(key)
            if slot is None:
                if self._free:
                    slot = self._free.pop()
                else:
                    slot = len(self._slot)
                    if slot >= len(self._E):
                        self._E = np.concatenate([self._E, np.zeros_like(self._E)])
                        self._w = np.concatenate([self._w, np.zeros_like(self._w)])
                self._slot[key] = slot
            self._E[slot], self._w[slot] = E[i], w[i]

    def apply_delta(self, clock: int, dense: bool) -> dict:
        """Copies rows used since the last sync (and drops expired ids); the dense weights if `dense`.
        `clock` is the number of steps run."""
        table = self.trainer.table
        row_ids = table.row_ids.numpy()
        last_seen = table.last_seen.numpy()
        touched = np.flatnonzero((last_seen > self.synced_clock) & (row_ids > 0))
        touched = touched[touched > 0]
        E = mesh_lib.to_numpy(self.trainer.sparse.E)
        w = mesh_lib.to_numpy(self.trainer.sparse.w)
        self._put(row_ids[touched], E[touched], w[touched])
        removed = 0
        if self._slot:
            keys = np.fromiter(self._slot.keys(), np.int64, len(self._slot))
            gone = keys[table.lookup(tf.constant(keys)).numpy() == 0]
            for key in gone.tolist():
                self._free.append(self._slot.pop(key))
            removed = len(gone)
        if dense:
            self._dense = [mesh_lib.to_numpy(v) for v in self.trainer.model.weights]
        self.synced_clock = clock - 1  # steps 0..clock-1 have run, each using the table at its own clock
        return {"rows_updated": len(touched), "rows_removed": removed, "dense_synced": dense}

    def publish(self, info: dict, logit_shift: float) -> int:
        """Writes the copy as the next version and makes it current; returns the version."""
        trainer = self.trainer
        keys = np.fromiter(self._slot.keys(), np.int64, len(self._slot))
        slots = np.fromiter(self._slot.values(), np.int64, len(self._slot))
        module = ServingCTR(
            trainer.model_config,
            keys,
            self._E[slots],
            self._w[slots],
            self._dense,
            trainer.field_mask,
            logit_shift,
        )
        version = self.version + 1
        final = self.dir / f"{version:08d}"
        staging = self.dir / f".{version:08d}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        save_serving(module, staging)
        (staging / "sync.json").write_text(
            json.dumps({**info, "version": version, "rows": len(keys), "published_unix": time.time()})
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        tmp = self.dir / ".LATEST.tmp"
        tmp.write_text(f"{version:08d}\n")
        os.replace(tmp, self.dir / "LATEST")  # atomic: readers see the old version or the new one
        self.version = version
        versions = sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.isdigit())
        for old in versions[: -self.keep_versions]:
            shutil.rmtree(old, ignore_errors=True)
        return version


class ServingCopy:
    """The reader side of a serving directory: `refresh` loads ``S/<LATEST>`` when LATEST changes."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.version: str | None = None
        self.info: dict = {}
        self._serve = None

    def refresh(self) -> bool:
        latest = self.dir / "LATEST"
        if not latest.is_file():
            return False
        version = latest.read_text().strip()
        if version == self.version:
            return False
        loaded = tf.saved_model.load(str(self.dir / version))
        self._serve, self._keep = loaded.signatures["serving_default"], loaded
        self.info = json.loads((self.dir / version / "sync.json").read_text())
        self.version = version
        return True

    def probability(self, fields: dict) -> np.ndarray:
        if self._serve is None and not self.refresh():
            raise HeadraceError(f"{self.dir}: no serving copy yet (no LATEST)")
        return self._serve(**{k: tf.constant(v) for k, v in fields.items()})["probability"].numpy()


def _validate(config) -> None:
    for name in ("bootstrap", "examples", "serving_dir", "output"):
        if not getattr(config, name):
            raise ConfigError(f"--{name.replace('_', '-')} is required with --online")
    if config.feature_selection != "none":
        raise ConfigError("--feature-selection applies to batch training, not --online")
    if config.sync_every <= 0 or config.dense_sync_every < config.sync_every:
        raise ConfigError("--sync-every must be > 0 and --dense-sync-every >= --sync-every")


def train_online(config) -> dict:
    """Trains from the topic until `max_examples` are trained or the topic is idle for `idle_timeout`
    seconds (0: forever); returns the run's counters (also in OUTPUT/metrics.json)."""
    _validate(config)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.dump(config, out / "resolved_config.json")
    mesh = resolve_mesh(config)
    if mesh is not None and "batch" in mesh.dim_names:
        raise ConfigError("--online trains batches of any size as they come: use a mesh without `batch`")
    stack.create_topics(config.bootstrap, [config.examples])
    partitions = sorted(p for (t, p) in stack.end_offsets(config.bootstrap, [config.examples]))
    readers = [PartitionReader(config.bootstrap, config.examples, p) for p in partitions]

    trainer = CTRTrainer(config, mesh)
    # Read positions: every example below is trained, rejected, or pending in the shuffle buffer, whose
    # contents are saved alongside (`pending_*`).
    offsets = tf.Variable(np.zeros(len(partitions), np.int64), trainable=False, name="offsets")
    trained = tf.Variable(np.int64(0), trainable=False, name="examples_trained")
    rejected = tf.Variable(np.int64(0), trainable=False, name="examples_rejected")
    keep_rate = tf.Variable(1.0, trainable=False, name="negative_keep_rate")
    pending_lines = tf.Variable(tf.zeros([0], tf.string), shape=[None], trainable=False, name="pending")
    pending_where = tf.Variable(
        tf.zeros([0, 2], tf.int64), shape=[None, 2], trainable=False, name="pending_where"
    )
    manager = PairedCheckpoint(
        trainer,
        out / "checkpoint",
        extra_host={
            "offsets": offsets,
            "trained": trained,
            "rejected": rejected,
            "keep_rate": keep_rate,
            "pending": pending_lines,
            "pending_where": pending_where,
        },
    )
    buffer = ShuffleBuffer(config.batch_size, config.shuffle_buffer, config.max_wait, config.seed)
    step = 0
    if manager.restore_latest() is not None:
        step = int(mesh_lib.to_numpy(trainer.step))
        buffer.restore(pending_lines.numpy(), pending_where.numpy(), time.monotonic())
        _log.info(
            "online: resumed at step %d, %d examples trained, offsets %s, %d pending",
            step,
            int(trained.numpy()),
            offsets.numpy().tolist(),
            len(buffer),
        )
    publisher = ServingPublisher(trainer, Path(config.serving_dir), config.keep_versions)
    summaries = Summaries(out / "tensorboard" / "online")
    progress = Progress(None, config.batch_size, config.log_every_seconds, name="ctr online")
    rates = (config.learning_rate, config.embedding_learning_rate, config.l2)
    sync_log = out / "syncs.jsonl"
    now = time.monotonic()
    last_sync = last_dense = last_ckpt = last_data = now
    losses = []
    trained_here, busy = 0, 0.0  # this run's examples and seconds of work (waiting for data excluded)

    def checkpoint():
        lines, where = buffer.state()
        pending_lines.assign(tf.constant(lines, tf.string, shape=[len(lines)]))
        pending_where.assign(where)
        manager.save(step)

    def sync(dense: bool):
        info = publisher.apply_delta(step, dense)
        info.update(
            step=step,
            examples_trained=int(trained.numpy()),
            offsets=offsets.numpy().tolist(),
            trained_below=buffer.lowest(offsets.numpy()).tolist(),
            pending=len(buffer),
            loss=float(np.mean(losses[-50:])) if losses else None,
        )
        version = publisher.publish(info, math.log(float(keep_rate.numpy())))
        with open(sync_log, "a") as f:
            f.write(json.dumps({**info, "version": version, "unix": time.time()}) + "\n")
        summaries.scalars(step, {"serving/version": version, "serving/rows_updated": info["rows_updated"]})

    while True:
        # Poll every partition for what is new.
        got, worked, started = 0, False, time.monotonic()
        read, now = offsets.numpy(), started
        for i, reader in enumerate(readers):
            end = reader.end()
            if end > read[i]:
                stop = min(end, read[i] + config.read_chunk)
                lines = reader.read(int(read[i]), int(stop))
                for k, line in enumerate(lines):
                    buffer.add(i, int(read[i]) + k, line, now)
                read[i] += len(lines)
                got += len(lines)
        now = time.monotonic()
        if got:
            offsets.assign(read)
            last_data = now
        # Train while the buffer is full or holds an example that has waited `max_wait`.
        while buffer.ready(now):
            batch = buffer.take(now)
            good = [line for _, _, line in batch if _valid(line)]
            bad = len(batch) - len(good)
            if bad:
                rejected.assign_add(bad)
                where = [f"{readers[i].partition}@{offset}" for i, offset, line in batch if not _valid(line)]
                _log.warning(
                    "online: %d malformed example line(s) skipped in %s[partition@offset]: %s",
                    bad,
                    config.examples,
                    ", ".join(where[:10]) + (" ..." if bad > 10 else ""),
                )
            if good:
                fields, labels, weights = parse_examples(good)
                negative = weights.numpy()[labels.numpy() == 0]
                if len(negative):
                    keep_rate.assign(float(1.0 / negative[-1]))
                loss = trainer.train_on_batch(serving_ids(fields), labels, step, rates)
                trained_here += len(good)
                worked = True
                step += 1
                losses.append(loss)
                summaries.scalars(step, {"loss": loss})
                progress.update(step, {"loss": loss, "trained": float(trained.numpy() + len(good))})
            trained.assign_add(len(good))
            if config.expire_steps and step % config.expire_every == 0:
                trainer.table.expire(tf.constant(step, tf.int64))
            now = time.monotonic()
        done = bool(config.max_examples) and int(trained.numpy() + rejected.numpy()) >= config.max_examples
        idle = bool(config.idle_timeout) and not len(buffer) and now - last_data >= config.idle_timeout
        if done or idle or now - last_sync >= config.sync_every:
            dense = done or idle or now - last_dense >= config.dense_sync_every
            sync(dense)
            worked, last_sync = True, now
            if dense:
                last_dense = now
        if done or idle or now - last_ckpt >= config.checkpoint_every_seconds:
            checkpoint()
            worked, last_ckpt = True, now
        if got or worked:
            busy += time.monotonic() - started
        if done or idle:
            break
        if not got:
            time.sleep(config.poll_interval)
    summaries.close()
    result = {
        "steps": step,
        "examples_trained": int(trained.numpy()),
        "examples_rejected": int(rejected.numpy()),
        "offsets": dict(zip(map(str, partitions), offsets.numpy().tolist())),
        "serving_version": publisher.version,
        "negative_keep_rate": float(keep_rate.numpy()),
        "stopped": "max_examples" if done else "idle",
        # What this run's work sustains: reading, training, publishing and checkpointing, not the waits for
        # data (nor for the shuffle buffer to fill).
        "examples_per_sec": trained_here / busy if busy else 0.0,
        **trainer.table.counters(),
    }
    write_json(out / "metrics.json", result)
    return result
