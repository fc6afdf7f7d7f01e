"""Kafka clients the Kafka tests run as child processes (tfio's Kafka ops in the pytest process made a
later Flink test crash)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_PRODUCE = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
from headrace.runners.kafka import KafkaProducer
bootstrap, topic, path = sys.argv[1:4]
producer = KafkaProducer(bootstrap)
for line in open(path):
    producer.send(topic, line.rstrip("\\n"))
producer.flush()
"""


def produce_file(bootstrap: str, topic: str, path: Path) -> None:
    """Sends each line of `path` to `topic`, in order."""
    proc = subprocess.run(
        [sys.executable, "-c", _PRODUCE, bootstrap, topic, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
