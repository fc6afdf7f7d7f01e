"""The streaming join on the standalone Flink cluster (2 TaskManagers x 1 slot, parallelism 2, Python
stages in TaskManager-started SDK workers): one TaskManager is SIGKILLed mid-stream (with its SDK workers),
a replacement starts as a Kubernetes Deployment would start one, and the job restarts from its last
checkpoint. Every impression still ends as exactly one final decision (what the restored job wrote twice
counted once), equal to the plain-Python reference; every late click is on the late topic."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from headrace.runners import flink_cluster as fc
from headrace.runners import stack

from .test_flink_cluster import _get
from .test_streaming_end_to_end import _read, _wait_for
from .test_streaming_recovery import _decided, _join_command, _replay, _start, _stream_log


def _running_job(cluster) -> dict:
    running = [j for j in _get(cluster, "/jobs/overview")["jobs"] if j["state"] == "RUNNING"]
    assert len(running) == 1, running
    return running[0]


@pytest.mark.slow
@pytest.mark.flink
@pytest.mark.kafka
def test_join_on_the_cluster_survives_a_killed_taskmanager(kafka_broker, flink_jar, tmp_path):
    impressions, clicks, positives, negatives = _stream_log(tmp_path, 6000, seed=34)
    expected = len(positives) + len(negatives)
    topics = ["cl-impressions", "cl-actions", "cl-examples", "cl-late", "cl-rejected"]
    stack.create_topics(kafka_broker, topics)
    join_log = tmp_path / "join.log"
    join = replay = None
    with fc.flink_cluster(taskmanagers=2, slots=1, workdir=tmp_path / "cluster") as cluster:
        try:
            join_cmd = _join_command(
                kafka_broker, topics, tmp_path / "checkpoints", *cluster.beam_args(parallelism=2)
            )
            join = _start(join_cmd, join_log)
            deadline = time.monotonic() + 240
            while fc.overview(cluster)["jobs-running"] < 1:
                assert join.poll() is None, join_log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the join never ran on the cluster"
                time.sleep(1)
            replay = _replay(kafka_broker, topics, tmp_path)
            written = lambda: stack.end_offsets(kafka_broker, [topics[2]])[(topics[2], 0)]
            _wait_for(written, expected // 3, 300, "a third of the examples", join_log)
            assert any((tmp_path / "checkpoints").glob("*/chk-*/_metadata")), "no checkpoint yet"
            # One TaskManager dies with its SDK workers (its process group); a replacement registers.
            os.killpg(cluster.pids["taskmanager-1"], signal.SIGKILL)
            killed_at = written()
            fc.add_taskmanager(cluster)
            out, _ = replay.communicate(timeout=300)
            assert replay.returncode == 0
            sent = json.loads(out.strip().splitlines()[-1])
            assert sent["impressions"] == len(impressions) and sent["actions"] == len(clicks)
            decided = lambda: len(_decided(kafka_broker, topics[2]))
            _wait_for(decided, expected, 300, "every decision", join_log)
            late = lambda: len({k for k, _ in _read(kafka_broker, topics[3])})
            _wait_for(late, len(clicks) - len(positives), 120, "every late click", join_log)
            assert join.poll() is None, "the join's submitting process exited"
            job = _running_job(cluster)
            tm = fc.overview(cluster)
            assert tm["taskmanagers"] == 2 and tm["slots-total"] == 2
            # Flink's own record: the job restored a checkpoint after the failure
            restored = _get(cluster, f"/jobs/{job['jid']}/checkpoints")["latest"].get("restored")
        finally:
            for proc in (replay, join):
                if proc is not None and proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM) if proc is join else proc.kill()
                    proc.wait(60)
    assert killed_at < expected  # the kill came mid-stream
    assert restored, "the job did not restore from a checkpoint after the TaskManager died"
    decided = _decided(kafka_broker, topics[2])
    assert all(len(labels) == 1 for labels in decided.values())
    assert {r for r, labels in decided.items() if labels == {"1"}} == positives
    assert {r for r, labels in decided.items() if labels == {"0"}} == negatives
    assert {k for k, _ in _read(kafka_broker, topics[3])} == clicks - positives
