"""The online trainer on a real Kafka broker: serving copies, counts that reconcile, SIGKILL and resume.

The trainer runs as its own process (as in production, and because tfio's Kafka ops in the pytest process
made a later Flink test crash); examples are produced by a child process too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from headrace.models import metrics as metrics_lib
from headrace.runners import stack
from headrace.runners.serving import ServingCopy

from .kafka_children import produce_file


def _criteo(tmp_path: Path, n: int, seed: int) -> list[list[str]]:
    from headrace.pipelines.ctr_data import generate

    generate(tmp_path / f"log-{seed}.tsv", n, seed=seed)
    rows = [line.split("\t") for line in (tmp_path / f"log-{seed}.tsv").read_text().splitlines()]
    return [r for r in rows if len(r) == 40 and r[0] in ("0", "1")]


def _produce(bootstrap: str, topic: str, rows, path: Path) -> int:
    """Writes rows as example lines (label, weight 1, 39 fields) to the topic; returns the count."""
    path.write_text("".join("\t".join([r[0], "1", *r[1:]]) + "\n" for r in rows))
    produce_file(bootstrap, topic, path)
    return len(rows)


def _trainer(bootstrap: str, topic: str, work: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "headrace.runners.cli",
        "train",
        "ctr",
        "--online",
        "--bootstrap",
        bootstrap,
        "--examples",
        topic,
        "--serving-dir",
        str(work / "serving"),
        "--output",
        str(work / "model"),
        "--mesh",
        "",
        "--capacity",
        "65536",
        "--model",
        "fm",
        *extra,
    ]


def _run(cmd: list[str]) -> str:
    """Runs a trainer to its end (it stops when idle); its log."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _fields(rows):
    from headrace.models.criteo import FIELDS

    return {name: np.array([r[1 + k] for r in rows]) for k, name in enumerate(FIELDS)}


@pytest.mark.kafka
def test_online_trainer_syncs_serving_copies_and_reconciles(kafka_broker, tmp_path):
    rows = _criteo(tmp_path, 7000, seed=11)
    early, late, held_out = rows[:500], rows[500:6000], rows[6000:]
    y = np.array([float(r[0]) for r in held_out])
    common = ("--batch-size", "64", "--idle-timeout", "4", "--sync-every", "0.3", "--dense-sync-every", "100")

    # The early part of the stream only: what a model trained once, on the first data, would know.
    _produce(kafka_broker, "online-examples", early, tmp_path / "early.txt")
    _run(_trainer(kafka_broker, "online-examples", tmp_path, *common))
    copy = ServingCopy(tmp_path / "serving")
    assert copy.refresh()
    version_early, auc_early = copy.version, metrics_lib.auc(y, copy.probability(_fields(held_out)))

    # The rest of the stream arrives; the trainer (restarted from its checkpoint) keeps learning.
    n = len(early) + _produce(kafka_broker, "online-examples", late, tmp_path / "late.txt")
    _run(_trainer(kafka_broker, "online-examples", tmp_path, *common))
    result = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert result["examples_trained"] == n and result["offsets"] == {"0": n}  # the topic, exactly
    assert stack.end_offsets(kafka_broker, ["online-examples"]) == {("online-examples", 0): n}

    serving = tmp_path / "serving"
    latest = (serving / "LATEST").read_text().strip()
    assert latest == f"{result['serving_version']:08d}" and (serving / latest / "saved_model.pb").is_file()
    assert not list(serving.glob(".*staging"))  # nothing half-written left behind
    assert len([p for p in serving.iterdir() if p.name.isdigit()]) <= 3  # old versions pruned
    syncs = [json.loads(line) for line in (tmp_path / "model" / "syncs.jsonl").read_text().splitlines()]
    assert len(syncs) >= 3 and syncs[-1]["examples_trained"] == n
    assert any(not s["dense_synced"] for s in syncs)  # sparse rows sync more often than dense weights
    assert sum(s["rows_updated"] for s in syncs) >= result["table_rows_used"]

    assert copy.refresh() and copy.version == latest != version_early  # the reader picked up the new copy
    p = copy.probability(_fields(held_out))
    assert p.shape == (len(held_out),) and np.all((p > 0) & (p < 1))
    auc = metrics_lib.auc(y, p)
    assert auc > 0.65 and auc > auc_early + 0.02, (auc_early, auc)  # learnt from the stream
    assert not copy.refresh()  # LATEST unchanged: nothing to reload


def _checkpointed(model: Path) -> tuple[int, list[int], int] | None:
    """(examples trained, read offsets, examples pending in the shuffle buffer) in the newest host
    checkpoint, if any."""
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(model / "checkpoint" / "host"))
    if latest is None:
        return None
    reader = tf.train.load_checkpoint(latest)
    trained = int(reader.get_tensor("trained/.ATTRIBUTES/VARIABLE_VALUE"))
    pending = len(reader.get_tensor("pending/.ATTRIBUTES/VARIABLE_VALUE"))
    return trained, reader.get_tensor("offsets/.ATTRIBUTES/VARIABLE_VALUE").tolist(), pending


@pytest.mark.kafka
def test_sigkill_mid_stream_resumes_without_loss_or_duplication(kafka_broker, tmp_path):
    rows = _criteo(tmp_path, 8000, seed=12)
    n = _produce(kafka_broker, "online-fault", rows, tmp_path / "examples.txt")
    cmd = _trainer(
        kafka_broker, "online-fault", tmp_path, "--batch-size", "32", "--read-chunk", "256",
        "--checkpoint-every-seconds", "0.3", "--sync-every", "1000", "--dense-sync-every", "1000",
        "--idle-timeout", "4",
    )  # fmt: skip
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    state = None
    while time.monotonic() < deadline and proc.poll() is None:
        state = _checkpointed(tmp_path / "model")
        if state is not None and state[0] >= 1000:  # mid-stream, a few checkpoints in
            break
        time.sleep(0.2)
    assert proc.poll() is None, (
        f"the trainer finished before it could be killed:\n{(tmp_path / 'first.log').read_text()[-2000:]}"
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    trained_at_kill, offsets_at_kill, pending_at_kill = _checkpointed(tmp_path / "model")
    # Read = trained + pending: the shuffle buffer's examples, read but not trained, are in the checkpoint.
    assert 0 < trained_at_kill < n and pending_at_kill > 0
    assert offsets_at_kill == [trained_at_kill + pending_at_kill]

    log = _run(cmd)
    resumed = f"{trained_at_kill} examples trained, offsets {offsets_at_kill}, {pending_at_kill} pending"
    assert resumed in log  # resumed exactly there
    result = json.loads((tmp_path / "model" / "metrics.json").read_text())
    # Every example of the topic trained exactly once across the two runs, counted from the checkpoint.
    assert result["examples_trained"] == n and result["offsets"] == {"0": n}


def _lines(labels) -> list[tuple[int, int, bytes]]:
    return [(0, k, f"{label}\t1\tline {k}".encode()) for k, label in enumerate(labels)]


def test_shuffle_buffer_mixes_a_class_sorted_stream_and_takes_each_example_once():
    from headrace.runners.shuffle_buffer import ShuffleBuffer

    buffer = ShuffleBuffer(batch_size=100, size=1000, max_wait=10.0, seed=0)
    for partition, offset, line in _lines([1] * 500 + [0] * 500):  # what a lagging join writes
        assert not buffer.ready(0.0)
        buffer.add(partition, offset, line, now=0.0)
    assert buffer.ready(0.0) and len(buffer) == 1000
    first = buffer.take(0.0)
    positives = sum(line.startswith(b"1") for _, _, line in first)
    assert len(first) == 100 and 30 < positives < 70  # both classes, about half each (arrival order: 100/0)
    assert not buffer.ready(5.0)  # below capacity, nothing has waited max_wait
    taken = [offset for _, offset, _ in first]
    while buffer.ready(10.0):  # all overdue now: drained in batches of at most 100
        batch = buffer.take(10.0)
        assert 0 < len(batch) <= 100
        taken += [offset for _, offset, _ in batch]
    assert sorted(taken) == list(range(1000)) and len(buffer) == 0


def test_shuffle_buffer_max_wait_state_and_arrival_order_without_shuffle():
    from headrace.runners.shuffle_buffer import ShuffleBuffer

    buffer = ShuffleBuffer(batch_size=4, size=100, max_wait=2.0, seed=1)
    for partition, offset, line in _lines([0, 1, 0]):
        buffer.add(partition, offset, line, now=0.0)
    for partition, offset, line in _lines([1] * 8)[3:]:
        buffer.add(partition, offset, line, now=1.5)
    assert not buffer.ready(1.9) and buffer.ready(2.0)
    batch = buffer.take(2.0)  # the three overdue ones, plus one drawn from the rest
    offsets = {offset for _, offset, _ in batch}
    assert {0, 1, 2} < offsets and len(batch) == 4
    remaining = {3, 4, 5, 6, 7} - offsets
    assert buffer.lowest([8]).tolist() == [min(remaining)]  # every offset below it is trained

    # The pending examples survive a checkpoint round trip (arrival is the restore time).
    lines, where = buffer.state()
    restored = ShuffleBuffer(batch_size=4, size=100, max_wait=2.0)
    restored.restore(lines, where, now=10.0)
    assert len(restored) == 4 and not restored.ready(11.0) and restored.ready(12.0)
    assert sorted(restored.take(12.0)) == sorted(
        zip(where[:, 0].tolist(), where[:, 1].tolist(), lines.tolist())
    )

    # Size 0: batches in arrival order.
    fifo = ShuffleBuffer(batch_size=3, size=0, max_wait=2.0)
    for partition, offset, line in _lines([0] * 7):
        fifo.add(partition, offset, line, now=0.0)
    assert [o for _, o, _ in fifo.take(0.0)] == [0, 1, 2] and [o for _, o, _ in fifo.take(0.0)] == [3, 4, 5]
    assert not fifo.ready(1.0) and [o for _, o, _ in fifo.take(2.0)] == [6]


_READ = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
from headrace.runners.kafka import PartitionReader
bootstrap, topic = sys.argv[1:3]
reader = PartitionReader(bootstrap, topic, 0)
end = reader.end()
ranges = [(0, end), (3, 4), (end - 1, end), (0, 1), (2, 2)]
print(json.dumps([end, [[m.decode() for m in reader.read(a, b)] for a, b in ranges]]))
"""


@pytest.mark.kafka
def test_replay_cli_and_offset_reads_on_the_broker(kafka_broker, tmp_path):
    """`stream replay` puts a log's impressions and clicks on their topics; reads by offset return exactly
    the asked range (tfio's one-message range works around its off-by-one)."""
    from headrace.pipelines.ctr_data import generate

    generate(tmp_path / "log.tsv", 300, seed=4)
    labels = [line.split("\t")[0] for line in (tmp_path / "log.tsv").read_text().splitlines()]
    cmd = [sys.executable, "-m", "headrace.runners.cli", "stream", "replay", "--input", str(tmp_path / "log.tsv"),
           "--bootstrap", kafka_broker, "--rate", "2000", "--mean-click-delay", "0.05",
           "--impressions", "replay-imps", "--actions", "replay-acts"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["impressions"] == 300 and counts["actions"] == labels.count("1") > 0
    ends = stack.end_offsets(kafka_broker, ["replay-imps", "replay-acts"])
    assert ends == {("replay-imps", 0): 300, ("replay-acts", 0): counts["actions"]}

    read = subprocess.run(
        [sys.executable, "-c", _READ, kafka_broker, "replay-imps"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert read.returncode == 0, read.stderr[-2000:]
    end, (everything, one, last, first, empty) = json.loads(read.stdout.strip().splitlines()[-1])
    assert end == 300 and [m.split("\t")[0] for m in everything] == [f"r{k}" for k in range(300)]
    assert one == everything[3:4] and last == everything[-1:] and empty == []
    assert first == []  # a lone first message waits for a second (documented)


@pytest.mark.kafka
def test_replay_runs_faster_than_real_time_with_event_time_stamps(kafka_broker, tmp_path):
    """`stream replay --rate 20000`: 20,000 impressions in about a second, each record's timestamp (the
    CreateTime the join reads) equal to the event time in its message."""
    from confluent_kafka import Consumer, TopicPartition

    from headrace.pipelines.ctr_data import generate

    generate(tmp_path / "log.tsv", 20000, seed=5)
    cmd = [sys.executable, "-m", "headrace.runners.cli", "stream", "replay", "--input", str(tmp_path / "log.tsv"),
           "--bootstrap", kafka_broker, "--rate", "20000", "--mean-click-delay", "0.001", "--impressions", "fast-imps",
           "--actions", "fast-acts"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["impressions"] == 20000
    assert counts["seconds"] < 5  # about 1 s on schedule; a loaded machine may fall a little behind
    consumer = Consumer(
        {"bootstrap.servers": kafka_broker, "group.id": "replay-check", "enable.auto.commit": False}
    )
    try:
        consumer.assign([TopicPartition("fast-imps", 0, 0)])
        got = []
        while len(got) < 20000:
            batch = consumer.consume(5000, timeout=10)
            assert batch, f"only {len(got)} impressions read back"
            got += [(m.timestamp()[1], m.value().split(b"\t", 2)[1]) for m in batch]
    finally:
        consumer.close()
    assert all(ts == int(t) for ts, t in got)
    span = (got[-1][0] - got[0][0]) / 1000
    assert 0.9 < span < 1.1  # the schedule: 20,000 impressions over one second of event time


@pytest.mark.kafka
def test_partitions_added_while_training_are_read(kafka_broker, tmp_path):
    topic = "online-growing"
    stack.create_topics(kafka_broker, [topic], partitions=1)
    rows = _criteo(tmp_path, 3000, seed=21)
    first, second = rows[:1000], rows[1000:]
    _produce(kafka_broker, topic, first, tmp_path / "first.txt")
    total = len(first) + len(second)
    cmd = _trainer(kafka_broker, topic, tmp_path, "--batch-size", "64", "--sync-every", "0.5")
    cmd += ["--partition-refresh", "1", "--max-examples", str(total), "--idle-timeout", "90"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        syncs = tmp_path / "model" / "syncs.jsonl"
        deadline = time.monotonic() + 180
        while not (syncs.exists() and syncs.read_text().strip()):  # the first part is being trained
            assert proc.poll() is None and time.monotonic() < deadline, "trainer did not start"
            time.sleep(0.5)
        stack.add_partitions(kafka_broker, [topic], 2)
        path = tmp_path / "second.txt"
        path.write_text("".join("\t".join([r[0], "1", *r[1:]]) + "\n" for r in second))
        assert stack.produce_lines(kafka_broker, topic, path, partition=1) == len(second)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    ends = stack.end_offsets(kafka_broker, [topic])
    assert ends == {(topic, 0): len(first), (topic, 1): len(second)}
    result = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert result["examples_trained"] == total
    assert result["offsets"] == {str(p): n for (_, p), n in ends.items()}
    assert "gained partition(s) [1]" in err
