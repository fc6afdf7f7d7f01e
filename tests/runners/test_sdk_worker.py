"""The SDK worker boot: the contract's flags and the runner's provision info become the environment Beam's
``sdk_worker_main`` reads (pipeline options, service descriptors, worker id)."""

from __future__ import annotations

import argparse
import json

from apache_beam.portability.api import beam_provision_api_pb2, endpoints_pb2
from google.protobuf import struct_pb2

from headrace.runners import sdk_worker


def test_worker_environment_from_flags_and_provision_info():
    options = struct_pb2.Struct()
    options.update({"beam:option:job_name:v1": "crowd", "beam:option:parallelism:v1": 4})
    info = beam_provision_api_pb2.ProvisionInfo(
        pipeline_options=options,
        runner_capabilities=["beam:protocol:control_response_elements_embedding:v1"],
        logging_endpoint=endpoints_pb2.ApiServiceDescriptor(url="localhost:5001"),
    )
    args = argparse.Namespace(id="3-1", control_endpoint="localhost:6000", logging_endpoint="localhost:9",
                              semi_persistent_directory="/tmp/sp")  # fmt: skip
    env = sdk_worker.worker_environment(args, info)
    assert env["WORKER_ID"] == "3-1"
    assert json.loads(env["PIPELINE_OPTIONS"])["beam:option:job_name:v1"] == "crowd"
    assert env["CONTROL_API_SERVICE_DESCRIPTOR"].strip() == 'url: "localhost:6000"'  # from the flag
    assert env["LOGGING_API_SERVICE_DESCRIPTOR"].strip() == 'url: "localhost:5001"'  # provision info wins
    assert "STATUS_API_SERVICE_DESCRIPTOR" not in env
    assert env["RUNNER_CAPABILITIES"] == "beam:protocol:control_response_elements_embedding:v1"
    assert env["SEMI_PERSISTENT_DIRECTORY"] == "/tmp/sp"
    assert sdk_worker.command_line()[1:] == ["-m", "headrace.runners.sdk_worker"]
