"""Runner selection, Beam options per runner, the Dataflow dry path and staged outputs."""

from __future__ import annotations

import pytest
from apache_beam.options.pipeline_options import FlinkRunnerOptions, PortableOptions, SetupOptions

from headrace.core.errors import ConfigError
from headrace.pipelines.example import ExampleConfig, build_example
from headrace.runners import beam_runner


@pytest.mark.parametrize(
    "name, expected",
    [
        (None, "FnApiRunner"),
        ("local", "FnApiRunner"),
        ("DirectRunner", "FnApiRunner"),
        ("flinkrunner", "FlinkRunner"),
        ("flink", "FlinkRunner"),
        ("DataflowRunner", "DataflowRunner"),
        ("BundleBasedDirectRunner", "BundleBasedDirectRunner"),
    ],
)
def test_runner_names_resolve(name, expected):
    assert beam_runner.resolve_runner(name) == expected


def test_unknown_runner_is_a_config_error():
    with pytest.raises(ConfigError, match="--runner 'Sparkish'"):
        beam_runner.resolve_runner("Sparkish")


def test_local_runner_is_the_in_process_fnapi_runner():
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    runner, _ = beam_runner.pipeline_options(None)
    assert isinstance(runner, FnApiRunner)


def test_flink_defaults_to_the_cached_jar_an_embedded_cluster_and_loopback(flink_jar):
    runner, options = beam_runner.pipeline_options("FlinkRunner", ["--parallelism=2"])
    flink = options.view_as(FlinkRunnerOptions)
    assert runner == "FlinkRunner"
    assert flink.flink_job_server_jar == str(flink_jar)
    assert flink.flink_master == "[local]"
    assert options.view_as(PortableOptions).environment_type == "LOOPBACK"


def test_flink_on_a_remote_cluster_keeps_the_users_environment(flink_jar):
    _, options = beam_runner.pipeline_options(
        "FlinkRunner", ["--flink_master=flink-jm:8081", "--environment_type=PROCESS"]
    )
    assert options.view_as(FlinkRunnerOptions).flink_master == "flink-jm:8081"
    assert options.view_as(PortableOptions).environment_type == "PROCESS"


def test_dataflow_needs_project_region_and_gcs_temp():
    with pytest.raises(ConfigError, match="--project, --region, --temp_location"):
        beam_runner.pipeline_options("DataflowRunner", [])
    with pytest.raises(ConfigError, match="gs:// path"):
        beam_runner.pipeline_options(
            "DataflowRunner", ["--project=p", "--region=r", "--temp_location=/tmp/x"]
        )


def test_dataflow_graph_builds_and_validates_without_submitting(tmp_path):
    args = [
        "--project=headrace-test",
        "--region=europe-west1",
        "--temp_location=gs://headrace-test/tmp",
        "--sdk_container_image=apache/beam_python3.11_sdk:2.62.0",
    ]
    pipeline = beam_runner.create_pipeline("DataflowRunner", args, dry_run=True, job_name="headrace-test")
    build_example(pipeline, ExampleConfig(output="gs://headrace-test/out", num_records=100))
    result = pipeline.run()  # validates options and translates the graph; dry_run stops before submit
    job = result.job.proto
    assert job.name == "headrace-test"
    names = {t.unique_name for t in result.job.proto_pipeline.components.transforms.values()}
    for step in (
        "Parse",
        "WriteTrain/Write/Write/WriteImpl/FinalizeWrite",
        "WriteReport/Write/Write/WriteImpl/FinalizeWrite",
    ):
        assert step in names, step
    assert result.job.options.view_as(SetupOptions).extra_packages in (None, [])
