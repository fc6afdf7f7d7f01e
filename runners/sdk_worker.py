"""A Beam Python SDK worker started as Beam's SDK container starts one, without the container.

    python -m headrace.runners.sdk_worker --id=ID --provision_endpoint=H:P --control_endpoint=H:P \
        --logging_endpoint=H:P [--artifact_endpoint=H:P]

These are the flags of Beam's container contract: a runner passes them to a PROCESS environment's command,
and a Beam worker pool passes them to its ``--container_executable``. Beam's worker pool without one starts
``python -c 'SdkHarness(...)'`` with whatever ``python`` is first on PATH (here, one without Beam), with no
pipeline options, and with its stdout on a pipe nobody reads; on the standalone Flink cluster those workers
died at start or stalled, and the jobs hung with their SDK connections cancelled. This does what the
container's boot does for Python: it asks the runner's provision service for the pipeline options, sets the
environment ``sdk_worker_main`` reads, sends stdout to stderr, and replaces itself with ``sdk_worker_main``
under this interpreter (the one the pipeline was built with, so the same packages are there).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

__all__ = ["command_line", "main", "worker_environment"]


def _descriptor(url: str) -> str:
    from apache_beam.portability.api import endpoints_pb2
    from google.protobuf import text_format

    return text_format.MessageToString(endpoints_pb2.ApiServiceDescriptor(url=url))


def worker_environment(args: argparse.Namespace, info) -> dict[str, str]:
    """The environment ``sdk_worker_main`` reads, from the contract's flags and the provision info (whose
    endpoints, where it gives them, win over the flags, as in Beam's boot)."""
    from google.protobuf import json_format

    control = info.control_endpoint.url or args.control_endpoint
    logging_url = info.logging_endpoint.url or args.logging_endpoint
    env = {
        "WORKER_ID": args.id,
        "PIPELINE_OPTIONS": json_format.MessageToJson(info.pipeline_options),
        "CONTROL_API_SERVICE_DESCRIPTOR": _descriptor(control),
        "SEMI_PERSISTENT_DIRECTORY": args.semi_persistent_directory or tempfile.mkdtemp(prefix="beam-sdk-"),
        "RUNNER_CAPABILITIES": " ".join(info.runner_capabilities),
    }
    if logging_url:
        env["LOGGING_API_SERVICE_DESCRIPTOR"] = _descriptor(logging_url)
    if info.status_endpoint.url:
        env["STATUS_API_SERVICE_DESCRIPTOR"] = _descriptor(info.status_endpoint.url)
    return env


def _provision_info(endpoint: str, worker_id: str, timeout: float = 60.0):
    import grpc
    from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc

    with grpc.insecure_channel(endpoint) as channel:
        stub = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
        response = stub.GetProvisionInfo(
            beam_provision_api_pb2.GetProvisionInfoRequest(),
            metadata=[("worker_id", worker_id)],
            timeout=timeout,
            wait_for_ready=True,
        )
    return response.info


def command_line() -> list[str]:
    """The command that starts this module under the current interpreter."""
    return [sys.executable, "-m", "headrace.runners.sdk_worker"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="headrace sdk_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--id", required=True)
    parser.add_argument("--provision_endpoint", required=True)
    parser.add_argument("--control_endpoint", default="")
    parser.add_argument("--logging_endpoint", default="")
    parser.add_argument("--artifact_endpoint", default="")
    parser.add_argument("--semi_persistent_directory", default="")
    args, _ = parser.parse_known_args(argv)
    info = _provision_info(args.provision_endpoint, args.id)
    env = {**os.environ, **worker_environment(args, info)}
    if not env["CONTROL_API_SERVICE_DESCRIPTOR"].strip():
        sys.exit(f"sdk_worker {args.id}: no control endpoint from the flags or the provision service")
    os.dup2(2, 1)  # a worker pool pipes stdout and never reads it: a full pipe would block the worker
    python = sys.executable
    os.execve(python, [python, "-m", "apache_beam.runners.worker.sdk_worker_main"], env)


if __name__ == "__main__":
    main()
