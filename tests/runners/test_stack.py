"""The streaming stack for real: a Kafka broker from Maven jars, read by tfio and by KafkaIO on Flink."""

from __future__ import annotations

import json
import subprocess
import sys

import apache_beam as beam
import pytest

from headrace.runners import cli, stack
from headrace.runners.beam_runner import create_pipeline

# tfio's Kafka ops run in a child process, as the online trainer does: librdkafka's threads left in this
# process made a later Flink test in the same session crash with a segmentation fault (seen here).
_TFIO = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow_io as tfio
import tensorflow_io.kafka as tfio_kafka
args = json.loads(sys.argv[1])
if args["op"] == "write":
    out = tfio_kafka.KafkaOutputSequence(topic=args["topic"], servers=args["bootstrap"])
    for i, m in enumerate(args["messages"]):
        out.setitem(i, m)
    out.flush()
else:
    ds = tfio.experimental.streaming.KafkaGroupIODataset(
        topics=[args["topic"]], group_id=args["group"], servers=args["bootstrap"], stream_timeout=3000,
        configuration=["session.timeout.ms=7000", "max.poll.interval.ms=8000", "auto.offset.reset=earliest"],
    )
    print(json.dumps([m.numpy().decode() for m, _ in ds]))
"""


def _tfio(**args) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _TFIO, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]) if args["op"] == "read" else []


def _write(bootstrap: str, topic: str, messages: list[str]) -> None:
    _tfio(op="write", bootstrap=bootstrap, topic=topic, messages=messages)


def _group_read(bootstrap: str, topic: str, group: str) -> list[str]:
    return _tfio(op="read", bootstrap=bootstrap, topic=topic, group=group)


@pytest.mark.kafka
def test_tfio_consumer_group_commits_offsets(kafka_broker):
    """What the online trainer relies on: a group resumes after what it consumed; another starts over."""
    messages = [f"event-{i}" for i in range(25)]
    _write(kafka_broker, "tfio-offsets", messages)
    assert _group_read(kafka_broker, "tfio-offsets", "trainer") == messages
    assert _group_read(kafka_broker, "tfio-offsets", "trainer") == []
    _write(kafka_broker, "tfio-offsets", ["late-1", "late-2"])
    assert _group_read(kafka_broker, "tfio-offsets", "trainer") == ["late-1", "late-2"]
    assert len(_group_read(kafka_broker, "tfio-offsets", "other")) == 27


@pytest.mark.flink
@pytest.mark.kafka
def test_kafkaio_on_flink_reads_the_topic(kafka_broker, flink, tmp_path):
    """Cross-language KafkaIO expanded by our expansion service, run EMBEDDED inside the Flink job server."""
    from apache_beam.io.kafka import ReadFromKafka

    messages = [f"impression-{i}" for i in range(40)]
    _write(kafka_broker, "beam-read", messages)
    out = tmp_path / "read"
    with (
        stack.expansion_service() as address,
        create_pipeline("FlinkRunner", [*flink, "--parallelism=1"]) as p,
    ):
        (
            p
            | ReadFromKafka(
                consumer_config={"bootstrap.servers": kafka_broker, "auto.offset.reset": "earliest"},
                topics=["beam-read"],
                max_num_records=len(messages),
                expansion_service=address,
            )
            | beam.Map(lambda kv: kv[1].decode())
            | beam.io.WriteToText(str(out), shard_name_template="")
        )
    assert sorted(out.read_text().split()) == sorted(messages)


@pytest.mark.kafka
def test_stack_cli_up_status_down(tmp_path, monkeypatch, capsys):
    built = stack.jars.jar_path("kafka-broker").parent  # the jars stay where make jars put them
    monkeypatch.setenv("HEADRACE_CACHE", str(tmp_path))
    (tmp_path / "jars").symlink_to(built, target_is_directory=True)
    port = stack.free_port()
    try:
        assert cli.main(["stack", "up", "--kafka-port", str(port)]) == 0
        assert f"127.0.0.1:{port}" in capsys.readouterr().out
        assert cli.main(["stack", "status"]) == 0
        assert f"127.0.0.1:{port}" in capsys.readouterr().out
        assert cli.main(["stack", "up", "--kafka-port", str(port)]) == 0  # already up: the same broker
    finally:
        assert cli.main(["stack", "down"]) == 0
    assert "stopped" in capsys.readouterr().out
    assert cli.main(["stack", "status"]) == 0
    assert "not running" in capsys.readouterr().out
