"""The Flink job-server jar is built from Maven Central at the version of the Beam SDK."""

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
    assert flink_jar.name == f"beam-runners-flink-1.19-job-server-{apache_beam.__version__}.jar"
    with zipfile.ZipFile(flink_jar) as jar:
        manifest = jar.read("META-INF/MANIFEST.MF").decode()
        assert "Main-Class: org.apache.beam.runners.flink.FlinkJobServerDriver" in manifest
        # Runner registrars are found through merged ServiceLoader files.
        services = jar.read("META-INF/services/org.apache.beam.sdk.runners.PipelineRunnerRegistrar")
        assert b"Flink" in services
