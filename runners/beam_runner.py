"""Beam runner selection and the run contract every pipeline shares.

Runners (``--runner``):

* ``FnApiRunner`` (default; aliases ``local``, ``DirectRunner``): Beam's in-process portable runner, named
  explicitly because the plain DirectRunner of newer Beam releases first tries to download a Go binary
  (Prism) from GitHub. ``--direct_num_workers=N --direct_running_mode=multi_processing`` uses N processes.
* ``BundleBasedDirectRunner``: the only local runner that executes ``TestStream`` (streaming tests).
* ``FlinkRunner``: Beam's Flink job server jar (built once by ``make jars``) is filled in for
  ``--flink_job_server_jar``; ``--flink_master`` defaults to ``[local]`` (an embedded cluster) and the SDK
  environment to ``LOOPBACK`` when the master is local. Give ``--flink_master=HOST:PORT`` (the JobManager's
  REST port) and ``--environment_type=PROCESS|DOCKER|EXTERNAL`` for a real cluster.
* ``DataflowRunner``: needs ``--project``, ``--region`` and a ``gs://`` ``--temp_location``; the built
  headrace wheel (``make wheel``) is staged with ``--extra_package`` unless ``--sdk_container_image`` or
  ``--setup_file`` is given. ``dry_run=True`` builds and validates the job graph without submitting.

`run_pipeline` is the contract: outputs are written under a staging directory beside ``output`` and renamed
into place only when the whole pipeline succeeded (`headrace.core.outputs.staged_output`), so a failed run
leaves nothing half-written; the resolved config is written next to the outputs. A Flink run without
``--job_endpoint`` gets a job server of its own for the run, stopped when it ends (Beam's own would live
until the Python process exits); with ``--job_endpoint=HOST:PORT`` it uses that one
(`headrace.runners.stack.flink_job_server`, what the tests share).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    FlinkRunnerOptions,
    GoogleCloudOptions,
    PipelineOptions,
    PortableOptions,
    SetupOptions,
    StandardOptions,
    TestOptions,
    WorkerOptions,
)

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError, HeadraceError, user_error_in
from headrace.core.outputs import staged_output
from headrace.runners import jars, stack

__all__ = [
    "RUNNERS",
    "RunResult",
    "create_pipeline",
    "pipeline_options",
    "resolve_runner",
    "run_pipeline",
]

_log = logging.getLogger(__name__)

RUNNERS = (
    "FnApiRunner",
    "BundleBasedDirectRunner",
    "FlinkRunner",
    "DataflowRunner",
    "PortableRunner",
)
_ALIASES = {
    "local": "FnApiRunner",
    "direct": "FnApiRunner",
    "directrunner": "FnApiRunner",
    "fnapi": "FnApiRunner",
    "flink": "FlinkRunner",
    "dataflow": "DataflowRunner",
    "portable": "PortableRunner",
}
_LOCAL_FLINK_MASTERS = ("[local]", "[auto]", "localhost", "127.0.0.1")


def resolve_runner(name: str | None) -> str:
    """The canonical runner name for `name` (case-insensitive, aliases allowed)."""
    if not name:
        return "FnApiRunner"
    for runner in RUNNERS:
        if runner.lower() == name.lower():
            return runner
    if name.lower() in _ALIASES:
        return _ALIASES[name.lower()]
    raise ConfigError(f"--runner {name!r}: expected one of {', '.join(RUNNERS)} (or local, flink)")


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def pipeline_options(
    runner: str | None = None,
    beam_args: Sequence[str] = (),
    *,
    streaming: bool = False,
    job_name: str | None = None,
) -> tuple[Any, PipelineOptions]:
    """Returns ``(runner, options)`` for `beam.Pipeline(runner=..., options=...)`.

    `beam_args` are Beam's own flags (``--parallelism=2``, ``--project=...``), passed through untouched
    apart from the defaults documented in the module docstring.
    """
    name = resolve_runner(runner)
    args = list(beam_args)
    if streaming and not _has_flag(args, "--streaming"):
        args.append("--streaming")
    if job_name and not _has_flag(args, "--job_name"):
        args.append(f"--job_name={job_name}")

    if name == "FlinkRunner":
        if not _has_flag(args, "--flink_job_server_jar"):
            args.append(f"--flink_job_server_jar={jars.jar_path('flink-job-server')}")
        if not _has_flag(args, "--flink_master"):
            args.append("--flink_master=[local]")
        options = PipelineOptions(args)
        master = options.view_as(FlinkRunnerOptions).flink_master
        local = any(master.startswith(m) for m in _LOCAL_FLINK_MASTERS)
        if local and not _has_flag(args, "--environment_type"):
            options.view_as(PortableOptions).environment_type = "LOOPBACK"
        options.view_as(StandardOptions).runner = "FlinkRunner"
        return "FlinkRunner", options

    if name == "DataflowRunner":
        options = PipelineOptions(args)
        gcp = options.view_as(GoogleCloudOptions)
        missing = [
            flag
            for flag, value in (
                ("--project", gcp.project),
                ("--region", gcp.region),
                ("--temp_location", gcp.temp_location),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"DataflowRunner needs {', '.join(missing)}")
        if not gcp.temp_location.startswith("gs://"):
            raise ConfigError(f"--temp_location={gcp.temp_location}: Dataflow needs a gs:// path")
        setup = options.view_as(SetupOptions)
        worker = options.view_as(WorkerOptions)
        if not (setup.extra_packages or setup.setup_file or worker.sdk_container_image):
            setup.extra_packages = [str(_wheel_for_workers())]
        options.view_as(StandardOptions).runner = "DataflowRunner"
        return "DataflowRunner", options

    options = PipelineOptions(args)
    options.view_as(StandardOptions).runner = name
    if name == "FnApiRunner":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner(), options
    if name == "BundleBasedDirectRunner":
        from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner

        return BundleBasedDirectRunner(), options
    return name, options


def flink_master_of(args: Sequence[str]) -> str:
    """The ``--flink_master`` of `args` ([local] when absent): the job server submits there."""
    for i, a in enumerate(args):
        if a.startswith("--flink_master="):
            return a.split("=", 1)[1]
        if a == "--flink_master" and i + 1 < len(args):
            return args[i + 1]
    return "[local]"


def _wheel_for_workers() -> Path:
    """The headrace wheel Dataflow workers install (built by `make wheel` into dist/)."""
    from importlib import metadata

    version = metadata.version("headrace")
    candidates = sorted(Path("dist").glob(f"headrace-{version}-*.whl"))
    if not candidates:
        raise ConfigError(
            f"no headrace-{version} wheel in ./dist for Dataflow workers; run `make wheel`, or pass "
            "--extra_package, --setup_file or --sdk_container_image"
        )
    return candidates[-1].resolve()


def create_pipeline(
    runner: str | None = None,
    beam_args: Sequence[str] = (),
    *,
    streaming: bool = False,
    job_name: str | None = None,
    dry_run: bool = False,
) -> beam.Pipeline:
    """A `beam.Pipeline` for `runner`; the only place headrace creates one from flags."""
    runner_obj, options = pipeline_options(runner, beam_args, streaming=streaming, job_name=job_name)
    if dry_run:
        options.view_as(TestOptions).dry_run = True
    # Pickle the main session is never needed: DoFns are module-level and import what they use.
    options.view_as(SetupOptions).save_main_session = False
    return beam.Pipeline(runner=runner_obj, options=options)


# ---------------------------------------------------------------------------------------------------
# The run contract: staged output, committed on success
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    output: Path
    runner: str
    seconds: float
    state: str


def run_pipeline(
    build: Callable[[beam.Pipeline, Any], Any],
    config: Any,
    *,
    runner: str | None = None,
    beam_args: Sequence[str] = (),
    overwrite: bool = False,
    job_name: str | None = None,
) -> RunResult:
    """Builds ``build(pipeline, config)`` with ``config.output`` staged, runs it, and commits the output.

    `config` is a frozen dataclass with an ``output`` field. The pipeline sees a copy whose ``output`` is
    the staging directory; ``resolved_config.json`` (the config as the user resolved it, plus the runner
    and Beam flags) is written beside its outputs before the commit.
    """
    output = getattr(config, "output", None)
    if not output:
        raise ConfigError("--output is required")
    name = resolve_runner(runner)
    beam_args = list(beam_args)
    with contextlib.ExitStack() as services, staged_output(output, overwrite=overwrite) as staging:
        if name == "FlinkRunner" and not _has_flag(beam_args, "--job_endpoint"):
            beam_args.append(
                f"--job_endpoint={services.enter_context(stack.flink_job_server(flink_master_of(beam_args)))}"
            )
        staged_config = dataclasses.replace(config, output=str(staging))
        pipeline = create_pipeline(name, beam_args, job_name=job_name)
        build(pipeline, staged_config)
        start = time.perf_counter()
        try:
            result = pipeline.run()
            state = result.wait_until_finish()
        except Exception as exc:  # a remote runner reports a worker's input error as text: say it once
            found = None if isinstance(exc, HeadraceError) else user_error_in(str(exc))
            if found is None:
                raise
            raise found from None
        seconds = time.perf_counter() - start
        if str(state) not in ("DONE", "PipelineState.DONE"):
            raise HeadraceError(f"pipeline finished in state {state}")
        extra = {"runner": name, "beam_args": list(beam_args), "seconds": round(seconds, 3)}
        if isinstance(staging, str):  # object store: the resolved config goes up with the outputs
            from apache_beam.io.filesystems import FileSystems

            with FileSystems.create(f"{staging}/resolved_config.json") as f:
                f.write(config_lib.dumps(config, extra=extra).encode())
        else:
            config_lib.dump(config, staging / "resolved_config.json", extra=extra)
    _log.info("%s: %s finished in %.1fs", output, name, seconds)
    return RunResult(output=Path(output), runner=name, seconds=seconds, state=str(state))


def submit_pipeline(
    build: Callable[[beam.Pipeline, Any], Any],
    config: Any,
    *,
    runner: str | None = None,
    beam_args: Sequence[str] = (),
    overwrite: bool = False,
    job_name: str | None = None,
) -> str:
    """Builds ``build(pipeline, config)`` and submits it to Dataflow without waiting; returns the job id.

    For a Flex Template's launcher, which must exit once the job is submitted: no process is left to
    rename a staging directory, so the job writes under ``config.output`` itself, which must be empty
    (or ``overwrite``). ``resolved_config.json`` (with ``"detached": true``) is written first; the job
    writes report.json, after its counts reconcile, so an output without one is not (yet) complete.
    """
    from apache_beam.io.filesystems import FileSystems

    name = resolve_runner(runner)
    if name != "DataflowRunner":
        raise ConfigError(f"--detach submits to Dataflow; {name} runs wait for the job (drop --detach)")
    output = getattr(config, "output", "") or ""
    if not output:
        raise ConfigError("--output is required")
    output = output.rstrip("/")
    existing = FileSystems.match([f"{output}/*"])[0].metadata_list
    if existing and not overwrite:
        raise ConfigError(f"--output {output}: not empty (a detached job writes in place); pass --overwrite")
    if existing:
        FileSystems.delete([m.path for m in existing])
    pipeline = create_pipeline(name, beam_args, job_name=job_name)
    build(pipeline, config)
    extra = {"runner": name, "beam_args": list(beam_args), "detached": True}
    with FileSystems.create(f"{output}/resolved_config.json") as f:
        f.write(config_lib.dumps(config, extra=extra).encode())
    result = pipeline.run()
    job_id = result.job_id() if hasattr(result, "job_id") else str(result)
    _log.info("%s: submitted to %s as %s (not waiting)", output, name, job_id)
    return job_id
