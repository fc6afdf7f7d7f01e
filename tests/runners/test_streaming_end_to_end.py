"""The streaming path end to end on the real stack: `stream replay` -> Kafka -> `stream ctr-join` on Flink
(KafkaIO cross-language, the stateful join) -> Kafka -> `train ctr --online` -> serving copies.

The join's output is checked against a reference computed from the same log with plain Python: every
click is a positive or a late action, every impression gives one example (or a negative dropped by
sampling); the online trainer consumes exactly the examples topic and publishes serving copies."""

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
from headrace.pipelines.ctr_stream import keep_negative, parse_example_key, replay_events
from headrace.runners import stack
from headrace.runners.serving import ServingCopy

from .kafka_children import produce_file

CLI = [sys.executable, "-m", "headrace.runners.cli"]
WINDOW_S, KEEP, RATE, CLICK_DELAY_S = 3.0, 0.5, 150.0, 1.0


def _reference(lines: list[str]):
    """What the join must output for the replayed log: positives, late clicks, kept negatives."""
    impressions, clicks = {}, {}
    for topic, t_ms, message in replay_events(
        lines, start_ms=0, rate=RATE, mean_click_delay_s=CLICK_DELAY_S, prefix="e"
    ):
        rid = message.split("\t", 1)[0]
        (impressions if topic == "impressions" else clicks)[rid] = t_ms
    positives = {rid for rid, t in clicks.items() if t - impressions[rid] <= WINDOW_S * 1000}
    negatives = {rid for rid in impressions if rid not in positives and keep_negative(rid, KEEP)}
    return impressions, set(clicks), positives, negatives


def _read(bootstrap: str, topic: str) -> list[tuple[str, str]]:
    """(key, value) of every message on the topic (tfio, in a child process: see test_train_ctr_online)."""
    code = (
        "import json, os, sys\n"
        "os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n"
        "from headrace.runners.kafka import PartitionReader\n"
        "reader = PartitionReader(sys.argv[1], sys.argv[2], 0)\n"
        "pairs = reader.read_keyed(0, reader.end())\n"
        "print(json.dumps([[k.decode(), m.decode()] for k, m in pairs]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, bootstrap, topic],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [tuple(kv) for kv in json.loads(proc.stdout)]


def _wait_for(state, target, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = state()
        if now >= target:
            return
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}: at {now}; join log:\n{log.read_text()[-3000:]}")


def _trainer(
    bootstrap: str, work: Path, name: str, max_examples: int, topic: str = "e2e-examples"
) -> list[str]:
    return [
        *CLI,
        "train", "ctr", "--online", "--bootstrap", bootstrap, "--examples", topic,
        "--serving-dir", str(work / f"serving-{name}"), "--output", str(work / f"model-{name}"),
        "--mesh", "", "--capacity", "65536", "--model", "fm", "--batch-size", "64",
        "--sync-every", "1", "--dense-sync-every", "3", "--max-examples", str(max_examples),
        "--idle-timeout", "240",
    ]  # fmt: skip


@pytest.mark.flink
@pytest.mark.kafka
def test_replay_kafka_flink_join_online_trainer(kafka_broker, flink_jar, tmp_path):
    from headrace.models.criteo import FIELDS
    from headrace.pipelines.ctr_data import generate

    generate(tmp_path / "log.tsv", 10000, seed=21)
    lines = (tmp_path / "log.tsv").read_text().splitlines()
    stream, held_out = lines[:8000], [r.split("\t") for r in lines[8000:]]
    (tmp_path / "stream.tsv").write_text("\n".join(stream) + "\n")
    impressions, clicks, positives, negatives = _reference(stream)
    expected = len(positives) + len(negatives)

    topics = ["e2e-impressions", "e2e-actions", "e2e-examples", "e2e-late", "e2e-rejected"]
    stack.create_topics(kafka_broker, topics)
    join_log = tmp_path / "join.log"
    join_cmd = [
        *CLI,
        "stream", "ctr-join", "--runner", "flink", "--bootstrap", kafka_broker,
        "--impressions", topics[0], "--actions", topics[1], "--examples", topics[2], "--late", topics[3],
        "--rejected", topics[4], "--join-window", str(WINDOW_S), "--negative-keep-rate", str(KEEP),
        "--allowed-lateness", "2",
    ]  # fmt: skip
    with open(join_log, "w") as out:
        join = subprocess.Popen(join_cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    online = None
    try:
        # Ready when malformed impressions come back on the rejected topic: the job reads and writes.
        # (Replaying into a job still starting makes one backlog, read topic by topic: every positive
        # first, then every negative, a class-sorted stream no online learner does well on.)
        probe = (
            "import sys; from headrace.runners.kafka import KafkaProducer; p = KafkaProducer(sys.argv[1]); "
        )
        probe += "[p.send(sys.argv[2], 'not an impression') for _ in (0, 1)]; p.flush()"
        subprocess.run([sys.executable, "-c", probe, kafka_broker, topics[0]], check=True, timeout=120)
        _wait_for(
            lambda: stack.end_offsets(kafka_broker, [topics[4]])[(topics[4], 0)],
            1,
            240,
            "the probe",
            join_log,
        )
        # The trainer runs alongside the join, as it would in production.
        with open(tmp_path / "online.log", "w") as out:
            online = subprocess.Popen(
                _trainer(kafka_broker, tmp_path, "online", expected), stdout=out, stderr=subprocess.STDOUT
            )
        replay = subprocess.run(
            [*CLI, "stream", "replay", "--input", str(tmp_path / "stream.tsv"), "--bootstrap", kafka_broker,
                   "--impressions", topics[0], "--actions", topics[1], "--rate", str(RATE),
                   "--mean-click-delay", str(CLICK_DELAY_S), "--prefix", "e"],
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert replay.returncode == 0, replay.stderr[-2000:]
        sent = json.loads(replay.stdout.strip().splitlines()[-1])
        assert sent["impressions"] == len(impressions) and sent["actions"] == len(clicks)

        def offsets():
            ends = stack.end_offsets(kafka_broker, [topics[2], topics[3]])
            return ends[(topics[2], 0)], ends[(topics[3], 0)]

        # One final decision per impression, and every positive written early too.
        written = expected + len(positives)
        _wait_for(
            offsets,
            (written, len(clicks) - len(positives)),
            timeout=300,
            what=f"{written} examples and {len(clicks) - len(positives)} late clicks",
            log=join_log,
        )
        assert online.wait(timeout=300) == 0, (tmp_path / "online.log").read_text()[-3000:]
    finally:
        if online is not None and online.poll() is None:
            online.kill()
        os.killpg(join.pid, signal.SIGTERM)
        try:
            join.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(join.pid, signal.SIGKILL)

    # The join against the reference: each click exactly once, as a positive or a late action; each
    # impression at most one example; negatives sampled by the request id's hash and weighted 1/R.
    examples = _read(kafka_broker, topics[2])
    late = _read(kafka_broker, topics[3])
    assert offsets() == (written, len(clicks) - len(positives))  # nothing more came after the wait
    # The probe (two messages: tfio cannot read a lone one), naming where each was and what was wrong.
    reason = "impression: expected 41 tab-separated fields, got 1"
    assert _read(kafka_broker, topics[4]) == [
        (f"{topics[0]}[0]@{i}", f"{topics[0]}[0]@{i}: {reason}") for i in (0, 1)
    ]
    keys = [parse_example_key(k) for k, _ in examples]
    # Keys carry the impression time (the replay's start plus the reference's offset).
    assert len({k[1] - impressions[k[0]] for k in keys}) == 1
    final = [(k[0], v) for k, (_, v) in zip(keys, examples, strict=True) if k[2]]
    early = [k[0] for k in keys if not k[2]]
    assert sorted(early) == sorted(positives)  # each positive early, once
    ids = [k for k, _ in final]
    assert len(set(ids)) == len(ids)
    by_label = {label: {k for k, v in final if v.split("\t")[0] == label} for label in ("0", "1")}
    assert by_label["1"] == positives
    assert by_label["0"] == negatives
    assert {v.split("\t")[1] for k, v in final if k in negatives} == {f"{1 / KEEP:.6g}"}
    assert {k for k, _ in late} == clicks - positives
    assert len(positives) > 500 and len(late) > 10  # the log exercises both cases

    # The online trainer trained each request once: the early positives' final decisions were skipped as
    # duplicates. It stops at --max-examples, so what it left unread can only be such duplicates (the
    # join may write a positive's final decision after the last new example).
    result = json.loads((tmp_path / "model-online" / "metrics.json").read_text())
    consumed = result["offsets"]["0"]
    unread = [parse_example_key(k) for k, _ in examples[consumed:]]
    assert result["examples_trained"] == expected and written - 5 <= consumed <= written
    assert all(final and rid in positives for rid, _, final in unread), unread
    assert result["duplicates_skipped"] == len(positives) - len(unread) and result["held"] == 0
    syncs = [json.loads(x) for x in (tmp_path / "model-online" / "syncs.jsonl").read_text().splitlines()]
    assert len({s["version"] for s in syncs}) >= 3

    # Monolith's batch baseline: a model trained once on the first part of the stream (the examples the
    # join made for the first 10% of impressions, shuffled, one pass), against the online serving copy.
    first_part = {f"e{k}" for k in range(len(stream) // 10)}
    first_lines = [v for k, v in final if k in first_part]
    (tmp_path / "first.txt").write_text("\n".join(first_lines) + "\n")
    produce_file(kafka_broker, "e2e-first", tmp_path / "first.txt")
    batch = _trainer(kafka_broker, tmp_path, "first", len(first_lines), topic="e2e-first")
    first = subprocess.run(
        [*batch, "--shuffle-buffer", str(len(first_lines)), "--max-wait", "60"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    fields = {name: np.array([r[1 + k] for r in held_out]) for k, name in enumerate(FIELDS)}
    y = np.array([float(r[0]) for r in held_out])
    aucs = {}
    for name in ("first", "online"):
        copy = ServingCopy(tmp_path / f"serving-{name}")
        assert copy.refresh()
        aucs[name] = metrics_lib.auc(y, copy.probability(fields))
    print("held-out AUC", aucs)
    # The serving copy kept learning from the stream and is clearly better than the batch model.
    assert aucs["online"] > aucs["first"] + 0.05, aucs
