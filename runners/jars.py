"""Java artifacts headrace runs with: where they are cached and how they are built from Maven Central.

Nothing is downloaded at run time. `headrace jars fetch` (called by `make jars`) resolves the artifacts
with Maven once, into ``$HEADRACE_CACHE/jars`` (default ``~/.cache/headrace/jars``); runners only look
them up and fail with a one-line instruction when they are missing. Beam's own HTTP download of jars is
never used: it needs the internet at run time, and the job-server uber jar it would fetch is not served by
every mirror (the POMs under ``runners/maven/`` shade the same jar from its parts).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from headrace.core.errors import MissingDependencyError

__all__ = ["BEAM_VERSION", "FLINK_VERSION", "JARS", "KAFKA_VERSION", "Jar", "cache_dir", "fetch", "jar_path"]

# Must equal the apache-beam pin in pyproject.toml (checked by tests/runners/test_jars.py).
BEAM_VERSION = "2.62.0"
FLINK_VERSION = "1.19"

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Jar:
    """A runnable jar built by shading a POM shipped in ``headrace/runners/maven``."""

    name: str
    pom: str
    filename: str

    @property
    def path(self) -> Path:
        return cache_dir() / "jars" / self.filename


KAFKA_VERSION = "3.9.1"

JARS = {
    # "-kafka": the job server also carries KafkaIO and the expansion service (a new name, so that caches
    # holding the plain job server rebuild it).
    "flink-job-server": Jar(
        name="flink-job-server",
        pom="flink-job-server.xml",
        filename=f"beam-runners-flink-{FLINK_VERSION}-job-server-kafka-{BEAM_VERSION}.jar",
    ),
    "kafka-broker": Jar(
        name="kafka-broker",
        pom="kafka-broker.xml",
        filename=f"kafka-broker-{KAFKA_VERSION}.jar",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("HEADRACE_CACHE", Path.home() / ".cache" / "headrace"))


def jar_path(name: str) -> Path:
    """The cached jar `name`; raises MissingDependencyError with the command that installs it."""
    jar = JARS[name]
    if not jar.path.is_file():
        raise MissingDependencyError(
            f"{jar.name} jar not found at {jar.path}; install it once with `make jars` "
            "(or `headrace jars fetch`)"
        )
    return jar.path


def fetch(names: list[str] | None = None, *, force: bool = False) -> list[Path]:
    """Builds the named jars (default: all) with Maven into the cache; skips those already there."""
    if shutil.which("mvn") is None:
        raise MissingDependencyError("`mvn` (Apache Maven) is not on PATH; it builds headrace's jars")
    built = []
    for name in names or sorted(JARS):
        jar = JARS[name]
        if jar.path.is_file() and not force:
            built.append(jar.path)
            continue
        jar.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"headrace-{name}-") as work:
            pom = Path(work) / "pom.xml"
            pom.write_bytes(resources.files("headrace.runners").joinpath("maven", jar.pom).read_bytes())
            _log.info("building %s with Maven (first time only)", jar.filename)
            proc = subprocess.run(
                ["mvn", "-B", "-q", "-f", str(pom), "package"],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                raise MissingDependencyError(f"Maven failed to build {jar.filename}:\n{tail}")
            (produced,) = [
                p for p in (Path(work) / "target").glob("*.jar") if not p.name.startswith("original-")
            ]
            tmp = jar.path.with_suffix(".jar.partial")
            shutil.copyfile(produced, tmp)
            os.replace(tmp, jar.path)  # a reader never sees half a jar
        built.append(jar.path)
    return built
