"""Shared test set-up: 8 virtual CPU devices before TensorFlow starts, quiet logs, common fixtures.

Every service a test needs is started once per session by a fixture and stopped when the session ends:
the Flink job server (`flink`: the Beam flags that run a pipeline on it), the Kafka broker
(`kafka_broker`). Tests that use them carry the ``flink`` / ``kafka`` markers; the session fails if one of
those JVMs outlives it.
"""

from __future__ import annotations

import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The BFC CPU allocator tracks peak memory of multi-device functions (unet3d measures it per device).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
warnings.filterwarnings("ignore", category=FutureWarning)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from headrace.core import mesh as mesh_lib  # noqa: E402
from headrace.runners import stack  # noqa: E402

# DTensor tests run on an 8-device mesh; the split must precede TensorFlow's runtime start.
mesh_lib.configure_virtual_devices(8)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def fnapi_pipeline():
    """A TestPipeline on the in-process FnApiRunner (named explicitly; see runners/beam_runner.py)."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.test_pipeline import TestPipeline

    def make():
        return TestPipeline(runner=FnApiRunner())

    return make


@pytest.fixture(scope="session")
def flink_jar() -> Path:
    """The Flink job-server jar; `make test` builds it first, so a missing jar is a failure, not a skip."""
    from headrace.runners import jars

    return jars.jar_path("flink-job-server")


@pytest.fixture(scope="session")
def flink(flink_jar) -> list[str]:
    """Beam flags that run a pipeline through the session's one Flink job server (embedded cluster)."""
    with stack.flink_job_server() as endpoint:
        yield [f"--job_endpoint={endpoint}"]


@pytest.fixture(scope="session")
def kafka_jar() -> Path:
    """The Kafka broker jar; `make test` builds it first."""
    from headrace.runners import jars

    return jars.jar_path("kafka-broker")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """A real Kafka broker (KRaft, loopback, a free port) for the session; its bootstrap address."""
    broker = stack.start_kafka(workdir=tmp_path_factory.mktemp("kafka"))
    try:
        yield broker.bootstrap
    finally:
        stack.stop(broker)


@pytest.fixture(scope="session")
def example_output(tmp_path_factory) -> Path:
    """The example pipeline's output on 4,000 generated records (FnApiRunner), shared by tests."""
    from headrace.pipelines.example import ExampleConfig, build_example
    from headrace.runners.beam_runner import run_pipeline

    out = tmp_path_factory.mktemp("example") / "out"
    run_pipeline(build_example, ExampleConfig(output=str(out), num_records=4000, malformed_every=100))
    return out


@pytest.fixture(scope="session")
def ctr_shards(tmp_path_factory) -> Path:
    """ctr-ingest output of 6,000 generated Criteo-format lines (planted model), FnApiRunner."""
    from headrace.pipelines.ctr import CtrIngestConfig, build_ctr_ingest
    from headrace.pipelines.ctr_data import generate
    from headrace.runners.beam_runner import run_pipeline

    root = tmp_path_factory.mktemp("ctr-shards")
    log = generate(root / "log.tsv", 6000, seed=11)
    run_pipeline(build_ctr_ingest, CtrIngestConfig(input=log.path, output=str(root / "out"), shards=2))
    return root / "out"


def _jvms() -> list[str]:
    """Command lines of running job-server and Kafka JVMs started from this process's session."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("java") and ("job-server" in cmd or "kafka.Kafka" in cmd):
            out.append(f"{proc.name}: {cmd[:160]}")
    return out


@pytest.fixture(scope="session", autouse=True)
def _no_jvm_outlives_the_session():
    """Fails the session when it leaves a job server or broker running (about 1 GB each)."""
    before = set(_jvms())
    yield
    deadline = time.monotonic() + 30
    while (left := set(_jvms()) - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"JVMs left running by the tests: {sorted(left)}"
