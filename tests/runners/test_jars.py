"""The jars built from Maven Central: the Flink job server (with KafkaIO) at the Beam SDK's version, a Kafka broker."""

from __future__ import annotations

import re
import zipfile
from importlib import resources

import apache_beam

from headrace.runners import jars


def test_jar_version_is_pinned_to_the_beam_sdk():
    assert apache_beam.__version__ == jars.BEAM_VERSION
    pom = resources.files("headrace.runners").joinpath("maven", "flink-job-server.xml").read_text()
    assert re.search(r"<beam.version>([^<]+)</beam.version>", pom).group(1) == apache_beam.__version__


def test_jar_runs_beams_flink_job_server(flink_jar):
    assert flink_jar.name == f"beam-runners-flink-1.19-job-server-kafka-{apache_beam.__version__}.jar"
    with zipfile.ZipFile(flink_jar) as jar:
        manifest = jar.read("META-INF/MANIFEST.MF").decode()
        assert "Main-Class: org.apache.beam.runners.flink.FlinkJobServerDriver" in manifest
        # Runner registrars are found through merged ServiceLoader files.
        services = jar.read("META-INF/services/org.apache.beam.sdk.runners.PipelineRunnerRegistrar")
        assert b"Flink" in services
        # Cross-language KafkaIO runs in the job server's JVM: KafkaIO, the expansion service, the harness.
        names = set(jar.namelist())
        for cls in (
            "org/apache/beam/sdk/io/kafka/KafkaIO.class",
            "org/apache/beam/sdk/expansion/service/ExpansionService.class",
            "org/apache/beam/fn/harness/FnHarness.class",
            "org/github/jamm/MemoryMeter.class",
        ):
            assert cls in names, cls


def test_kafka_broker_jar_runs_kafka(kafka_jar):
    with zipfile.ZipFile(kafka_jar) as jar:
        assert "Main-Class: kafka.Kafka" in jar.read("META-INF/MANIFEST.MF").decode()
        assert "kafka/tools/StorageTool.class" in set(jar.namelist())
