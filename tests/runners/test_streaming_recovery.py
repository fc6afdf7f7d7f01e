"""Effectively-once on the real stack: the join (Flink job server and all) and the online trainer are killed
with SIGKILL mid-stream, beside a CPU hog, and started again. The join resumes from its newest Flink
checkpoint and writes again what it wrote after it; the trainer resumes from its own checkpoint and skips
request ids it has trained. Every impression of the log ends as exactly one trained example or one
sampled-away negative, every click as a positive or a late action, nothing trained twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from headrace.pipelines.ctr_stream import parse_example_key
from headrace.runners import stack

from .test_streaming_end_to_end import CLI, _read, _reference, _trainer, _wait_for

WINDOW_S, KEEP, RATE = 3.0, 0.5, 150.0


def _decided(bootstrap: str, topic: str) -> dict[str, set[str]]:
    """Request id -> the labels of its final decisions on the examples topic."""
    decided: dict[str, set[str]] = {}
    for key, value in _read(bootstrap, topic):
        rid, _, watermark = parse_example_key(key)
        if watermark:
            decided.setdefault(rid, set()).add(value.split("\t")[0])
    return decided


def _start(cmd, log):
    with open(log, "a") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stream_log(tmp_path, lines: int, seed: int):
    """A generated log as TMP/stream.tsv, and the reference: (impressions, clicks, positives, negatives)."""
    from headrace.pipelines.ctr_data import generate

    generate(tmp_path / "log.tsv", lines, seed=seed)
    (tmp_path / "stream.tsv").write_text((tmp_path / "log.tsv").read_text())
    return _reference((tmp_path / "stream.tsv").read_text().splitlines())


def _join_command(bootstrap: str, topics: list[str], checkpoints, *beam_args: str) -> list[str]:
    """`stream ctr-join` over the five topics (impressions, actions, examples, late, rejected),
    checkpointing every 2 s into `checkpoints`."""
    return [
        *CLI, "stream", "ctr-join", "--runner", "flink", "--bootstrap", bootstrap,
        "--impressions", topics[0], "--actions", topics[1], "--examples", topics[2], "--late", topics[3],
        "--rejected", topics[4], "--join-window", str(WINDOW_S), "--negative-keep-rate", str(KEEP),
        "--allowed-lateness", "2", "--checkpoint-dir", str(checkpoints), "--checkpoint-interval", "2",
        *beam_args,
    ]  # fmt: skip


def _replay(bootstrap: str, topics: list[str], tmp_path) -> subprocess.Popen:
    """`stream replay` of TMP/stream.tsv at RATE; its last stdout line is the JSON of what it sent."""
    return subprocess.Popen(
        [*CLI, "stream", "replay", "--input", str(tmp_path / "stream.tsv"), "--bootstrap", bootstrap,
         "--impressions", topics[0], "--actions", topics[1], "--rate", str(RATE),
         "--mean-click-delay", "1", "--prefix", "e"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def _kill(proc):
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.mark.slow
@pytest.mark.flink
@pytest.mark.kafka
def test_join_and_trainer_killed_mid_stream_resume_effectively_once(kafka_broker, flink_jar, tmp_path):
    impressions, clicks, positives, negatives = _stream_log(tmp_path, 6000, seed=33)
    expected = len(positives) + len(negatives)

    topics = ["rec-impressions", "rec-actions", "rec-examples", "rec-late", "rec-rejected"]
    stack.create_topics(kafka_broker, topics)
    join_cmd = _join_command(kafka_broker, topics, tmp_path / "checkpoints")
    trainer_cmd = [*_trainer(kafka_broker, tmp_path, "online", expected, topic=topics[2])]
    trainer_cmd += ["--checkpoint-every-seconds", "2"]
    join_log, trainer_log = tmp_path / "join.log", tmp_path / "trainer.log"
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    join = trainer = replay = None
    try:
        join = _start(join_cmd, join_log)
        probe = (
            "import sys; from headrace.runners.kafka import KafkaProducer; p = KafkaProducer(sys.argv[1]); "
        )
        probe += "[p.send(sys.argv[2], 'not an impression') for _ in (0, 1)]; p.flush()"
        subprocess.run([sys.executable, "-c", probe, kafka_broker, topics[0]], check=True, timeout=120)
        rejected = lambda: stack.end_offsets(kafka_broker, [topics[4]])[(topics[4], 0)]
        _wait_for(rejected, 1, 240, "the probe", join_log)
        trainer = _start(trainer_cmd, trainer_log)
        replay = _replay(kafka_broker, topics, tmp_path)
        # Mid-stream (a third of the examples out, checkpoints taken), both die at once.
        written = lambda: stack.end_offsets(kafka_broker, [topics[2]])[(topics[2], 0)]
        _wait_for(written, expected // 3, 240, "a third of the examples", join_log)
        assert any((tmp_path / "checkpoints").glob("*/chk-*/_metadata")), "no join checkpoint yet"
        _kill(join)
        _kill(trainer)
        killed_at = written()
        time.sleep(3)
        join = _start(join_cmd, join_log)
        trainer = _start(trainer_cmd, trainer_log)
        out, _ = replay.communicate(timeout=240)
        assert replay.returncode == 0
        sent = json.loads(out.strip().splitlines()[-1])
        assert sent["impressions"] == len(impressions) and sent["actions"] == len(clicks)
        assert trainer.wait(timeout=400) == 0, trainer_log.read_text()[-3000:]
        late = lambda: len({k for k, _ in _read(kafka_broker, topics[3])})
        _wait_for(late, len(clicks) - len(positives), 120, "every late click", join_log)
        _wait_for(lambda: len(_decided(kafka_broker, topics[2])), expected, 120, "every decision", join_log)
    finally:
        for proc in (replay, trainer, join, hog):
            _kill(proc) if proc is not hog else (hog.kill(), hog.wait(10))

    assert "resuming from checkpoint" in join_log.read_text()
    assert killed_at < expected  # the kill came mid-stream
    # The join's final decisions, with what the restored join wrote twice counted once: exactly the
    # reference, and no request decided two ways.
    decided = _decided(kafka_broker, topics[2])
    early = {
        parse_example_key(k)[0] for k, _ in _read(kafka_broker, topics[2]) if not parse_example_key(k)[2]
    }
    missing = positives - {r for r, labels in decided.items() if labels == {"1"}}
    assert not missing, (len(missing), len(missing & early), sorted(missing)[:5], len(decided), expected)
    assert all(len(labels) == 1 for labels in decided.values())
    assert {r for r, labels in decided.items() if labels == {"1"}} == positives
    assert {r for r, labels in decided.items() if labels == {"0"}} == negatives
    assert {k for k, _ in _read(kafka_broker, topics[3])} == clicks - positives
    # The trainer trained each kept request exactly once across both runs.
    result = json.loads((tmp_path / "model-online" / "metrics.json").read_text())
    assert result["examples_trained"] == expected, result
    assert result["duplicates_skipped"] >= len(positives)
