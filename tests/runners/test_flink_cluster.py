"""A standalone Flink session cluster (a JobManager and two TaskManagers: separate JVMs on 127.0.0.1)
starts and stops as one, and runs ctr-ingest and crowd-labels at parallelism 4, on both TaskManagers, with
the Python stages in SDK worker processes the TaskManagers start (PROCESS), writing byte for byte what
the in-process runner writes."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from headrace.pipelines.crowd import CrowdConfig, build_crowd_labels
from headrace.pipelines.crowd_data import generate as generate_crowd
from headrace.pipelines.ctr import CtrIngestConfig, build_ctr_ingest
from headrace.pipelines.ctr_data import generate as generate_ctr
from headrace.runners import flink_cluster as fc
from headrace.runners.beam_runner import run_pipeline

pytestmark = pytest.mark.flink


@pytest.fixture(scope="module")
def cluster(flink_jar, tmp_path_factory):
    with fc.flink_cluster(taskmanagers=2, slots=2, workdir=tmp_path_factory.mktemp("flink-cluster")) as c:
        yield c
    # every process of the cluster is gone
    assert not any(fc._alive(pid) for pid in c.pids.values())


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "resolved_config.json"  # it records the runner and its flags
    }


def _get(cluster, path: str):
    with urllib.request.urlopen(f"http://{cluster.master}{path}", timeout=10) as r:
        return json.loads(r.read())


def _ran_on(cluster) -> tuple[set[str], int]:
    """The TaskManagers the newest finished job's tasks ran on, and its highest vertex parallelism."""
    finished = [j for j in _get(cluster, "/jobs/overview")["jobs"] if j["state"] == "FINISHED"]
    job = max(finished, key=lambda j: j["end-time"])
    detail = _get(cluster, f"/jobs/{job['jid']}")
    managers = set()
    for vertex in detail["vertices"]:
        for tm in _get(cluster, f"/jobs/{job['jid']}/vertices/{vertex['id']}/taskmanagers")["taskmanagers"]:
            managers.add(tm["taskmanager-id"])
    return managers, max(v["parallelism"] for v in detail["vertices"])


def _assert_same(cluster, build, config, tmp_path: Path) -> None:
    import dataclasses

    local = tmp_path / "local"
    run_pipeline(build, dataclasses.replace(config, output=str(local)))
    remote = tmp_path / "cluster"
    run_pipeline(build, dataclasses.replace(config, output=str(remote)), runner="flink",
                 beam_args=cluster.beam_args(parallelism=4))  # fmt: skip
    a, b = _files(local), _files(remote)
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"differ from the in-process run: {different}"
    managers, parallelism = _ran_on(cluster)
    assert parallelism == 4
    assert len(managers) == 2, f"the job ran on {managers}"
    assert json.loads((remote / "resolved_config.json").read_text())["run"]["runner"] == "FlinkRunner"


def test_the_cluster_is_two_taskmanagers_of_two_slots(cluster):
    overview = fc.overview(cluster)
    assert overview["taskmanagers"] == 2 and overview["slots-total"] == 4
    assert "--environment_type=PROCESS" in cluster.beam_args()


def test_ctr_ingest_on_the_cluster_writes_what_the_local_runner_writes(cluster, tmp_path):
    log = generate_ctr(tmp_path / "log.tsv", 3000, seed=5)
    _assert_same(cluster, build_ctr_ingest, CtrIngestConfig(input=log.path, output="", shards=2), tmp_path)


def test_crowd_labels_on_the_cluster_writes_what_the_local_runner_writes(cluster, tmp_path):
    data = generate_crowd(tmp_path / "crowd", num_tasks=400, num_workers=80, labels_per_task=4, seed=3)
    config = CrowdConfig(output="", annotations=data.annotations, annotators=data.annotators, tasks=data.tasks,
                         method="groupanno", iterations=5)  # fmt: skip
    _assert_same(cluster, build_crowd_labels, config, tmp_path)


def test_stack_up_flink_status_down(flink_jar, tmp_path, monkeypatch, capsys):
    from headrace.runners import cli

    monkeypatch.setenv("HEADRACE_CACHE", str(tmp_path))
    (tmp_path / "jars").symlink_to(flink_jar.parent, target_is_directory=True)
    try:
        assert cli.main(["stack", "up", "--flink", "--taskmanagers", "1", "--slots", "1"]) == 0
        shown = capsys.readouterr().out
        assert "1 TaskManagers x 1 slots" in shown and "--environment_type=PROCESS" in shown
        cluster = fc.status()
        assert cluster is not None and fc.overview(cluster)["taskmanagers"] == 1
        assert cli.main(["stack", "status"]) == 0
        assert cluster.master in capsys.readouterr().out
    finally:
        assert cli.main(["stack", "down"]) == 0
    assert "flink: stopped" in capsys.readouterr().out
    assert not any(fc._alive(pid) for pid in cluster.pids.values())
    assert cli.main(["stack", "status"]) == 0
    assert "flink: not running" in capsys.readouterr().out
