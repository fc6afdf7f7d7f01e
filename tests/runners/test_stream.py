"""The Flink flags `stream ctr-join` adds for its checkpoints and bundles (no JVM needed)."""

import dataclasses

from headrace.pipelines.ctr_stream import CtrJoinConfig
from headrace.runners.stream import bundle_args, checkpoint_args


def test_bundle_time_becomes_flinks_max_bundle_time():
    assert bundle_args(CtrJoinConfig()) == ["--max_bundle_time_mills=100"]
    assert bundle_args(dataclasses.replace(CtrJoinConfig(), bundle_time=1.5)) == [
        "--max_bundle_time_mills=1500"
    ]
    assert bundle_args(dataclasses.replace(CtrJoinConfig(), bundle_time=0.0001)) == [
        "--max_bundle_time_mills=1"
    ]
    assert bundle_args(dataclasses.replace(CtrJoinConfig(), bundle_time=0)) == []


def test_checkpoints_on_the_filesystem_resume_from_the_newest(tmp_path):
    config = dataclasses.replace(CtrJoinConfig(), checkpoint_dir=str(tmp_path / "chk"))
    args = checkpoint_args(config, [], str(tmp_path / "scratch"))
    assert "--checkpointing_interval=5000" in args
    assert "--state_backend=filesystem" in args
    assert "--finish_bundle_before_checkpointing" in args
    assert not any(a.startswith("--savepoint_path") for a in args)  # nothing to resume from yet
    done = tmp_path / "chk" / "job" / "chk-7"
    done.mkdir(parents=True)
    (done / "_metadata").write_bytes(b"")
    (tmp_path / "scratch").mkdir()
    args = checkpoint_args(config, ["--checkpointing_interval=250"], str(tmp_path / "scratch"))
    assert f"--savepoint_path={done.as_uri()}" in args
    assert not any(a.startswith("--checkpointing_interval") for a in args)  # the caller's interval stands
    assert checkpoint_args(dataclasses.replace(config, checkpoint_interval=0), [], str(tmp_path)) == []
