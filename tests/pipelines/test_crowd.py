"""crowd-labels: Beam EM equals a numpy EM, GroupAnno beats Dawid-Skene on planted group bias, real data,
malformed input, and the classifier learned from the posteriors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headrace.core.errors import ConfigError, InputError
from headrace.pipelines.crowd import CrowdConfig, build_crowd_labels
from headrace.pipelines.crowd_data import generate
from headrace.runners import cli
from headrace.runners.beam_runner import run_pipeline

from . import crowd_reference as ref

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "crowd_truth_infer"


def _run(tmp: Path, name: str, **kw) -> tuple[Path, dict]:
    out = tmp / name
    run_pipeline(build_crowd_labels, CrowdConfig(output=str(out), **kw))
    return out, json.loads((out / "report.json").read_text())


def _posteriors(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "posteriors.csv", dtype={"task": str}, keep_default_na=False).set_index("task")


def _labels(out: Path) -> pd.Series:
    return pd.read_csv(out / "labels.csv", dtype=str, keep_default_na=False).set_index("task")["label"]


# -------------------------------------------------------------------------------------------------
# The Beam EM equals the plain numpy EM
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate(
        tmp_path_factory.mktemp("crowd-small"), num_tasks=600, num_workers=120, labels_per_task=4, seed=3
    )


@pytest.mark.parametrize(
    "method, extra",
    [
        ("majority_vote", {}),
        ("dawid_skene", {}),
        ("groupanno", {}),
        ("groupanno", {"group_strength": 5.0}),
        ("groupanno", {"estimate_group_strength": True}),
    ],
)
def test_beam_em_equals_numpy_reference(small, tmp_path, method, extra):
    config = dict(
        annotations=small.annotations, method=method, iterations=15, tolerance=1e-9, partitions=5, **extra
    )
    if method == "groupanno":
        config["annotators"] = small.annotators
    out, report = _run(tmp_path, method, **config)
    data = ref.load(small.annotations, small.annotators)
    expected = ref.run(
        data,
        method,
        15,
        1e-9,
        fixed_tau=extra.get("group_strength"),
        estimate=bool(extra.get("estimate_group_strength")),
    )
    got = _posteriors(out).loc[data.tasks, data.classes].to_numpy()
    np.testing.assert_allclose(got, expected["q"], rtol=0, atol=1e-6)
    assert report["iterations"] == expected["iterations"]
    np.testing.assert_allclose(
        report["log_likelihood"] if method != "majority_vote" else [], expected["log_likelihood"], rtol=1e-9
    )
    if method == "groupanno":
        strengths = [report["groups"][g]["strength"] for g in sorted(report["groups"])]
        np.testing.assert_allclose(strengths, expected["group_strength"], rtol=1e-6)


def test_converged_runs_stop_and_keep_their_result(small, tmp_path):
    """Iterations after convergence are pass-throughs: 80 unrolled iterations give the converged answer."""
    _, report = _run(
        tmp_path, "ds", annotations=small.annotations, method="dawid_skene", iterations=80, tolerance=1e-5
    )
    data = ref.load(small.annotations)
    expected = ref.run(data, "dawid_skene", 80, 1e-5)
    assert report["converged"] and expected["converged"]
    assert report["iterations"] == expected["iterations"] < 80


# -------------------------------------------------------------------------------------------------
# Group bias
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    """Planted group bias, each worker giving about 5 labels."""
    root = tmp_path_factory.mktemp("crowd-sparse")
    data = generate(
        root, num_tasks=3000, num_workers=3000, labels_per_task=5, num_classes=3, num_groups=3, seed=7
    )
    reports = {}
    for method in ("majority_vote", "dawid_skene", "groupanno"):
        _, reports[method] = _run(
            root,
            method,
            annotations=data.annotations,
            annotators=data.annotators,
            truth=data.truth,
            method=method,
            iterations=40,
        )
    return data, root, reports


def test_groupanno_beats_dawid_skene_and_majority_vote_on_sparse_group_bias(sparse):
    _, _, reports = sparse
    acc = {m: r["truth"]["accuracy"] for m, r in reports.items()}
    assert acc["groupanno"] > acc["dawid_skene"] + 0.01, acc
    assert acc["groupanno"] > acc["majority_vote"] + 0.01, acc


def test_groupanno_recovers_the_planted_group_matrices(sparse):
    data, root, reports = sparse
    groups = pd.read_csv(root / "groupanno" / "groups.csv", dtype={"group": str})
    assert (root / "groupanno" / "groups.png").stat().st_size > 5000
    for g, planted in enumerate(data.group_matrices):
        rows = groups[groups.group == f"g{g}"]
        est = rows.pivot(index="true", columns="given", values="probability").to_numpy()
        np.testing.assert_allclose(est, planted, atol=0.06)
    assert set(reports["groupanno"]["groups"]) == {"g0", "g1", "g2"}


def test_one_group_and_many_labels_per_worker_reduces_to_dawid_skene(tmp_path):
    data = generate(tmp_path / "d", num_tasks=1500, num_workers=40, labels_per_task=8, num_groups=1, seed=11)
    ds, _ = _run(tmp_path, "ds", annotations=data.annotations, method="dawid_skene", iterations=30)
    ga, report = _run(
        tmp_path,
        "ga",
        annotations=data.annotations,
        annotators=data.annotators,
        method="groupanno",
        iterations=30,
    )
    labels_ds, labels_ga = _labels(ds), _labels(ga)
    agreement = (labels_ds.loc[labels_ga.index] == labels_ga).mean()
    assert agreement >= 0.99, agreement
    assert list(report["groups"]) == ["g0"]


# -------------------------------------------------------------------------------------------------
# Real data (../shared/data/crowd_truth_infer)
# -------------------------------------------------------------------------------------------------

PUBLISHED = {  # dataset: (majority vote, Dawid-Skene) accuracy, from the folder's README
    "d_jn-product": (0.897, 0.940),
    "s4_Dog_data": (0.818, 0.843),
    "s4_Face_Sentiment_Identification": (0.630, 0.640),
    "d_Duck_Identification": (0.759, 0.898),
}


def _real(tmp_path, name: str):
    folder = REAL / name
    if not folder.exists():
        pytest.skip(f"{folder} is absent (real datasets live in ../shared/data)")
    workers = pd.read_csv(folder / "annotations.csv", dtype=str).worker.unique()
    one_group = tmp_path / "one_group.csv"
    pd.DataFrame({"worker": workers, "group": "all"}).to_csv(one_group, index=False)
    common = dict(
        annotations=str(folder / "annotations.csv"), truth=str(folder / "truth.csv"), iterations=100
    )
    acc = {}
    for method in ("majority_vote", "dawid_skene", "groupanno"):
        extra = {"annotators": str(one_group)} if method == "groupanno" else {}
        _, report = _run(tmp_path, method, method=method, **common, **extra)
        assert report["read"] == report["used"] + report["rejected"]
        acc[method] = report["truth"]["accuracy"]
    return acc


def _check_published(acc, name):
    mv, ds = PUBLISHED[name]
    assert acc["majority_vote"] == pytest.approx(mv, abs=0.0015)
    assert acc["dawid_skene"] == pytest.approx(ds, abs=0.0015)
    # One group: GroupAnno must not flatten experienced annotators into it.
    assert acc["groupanno"] >= acc["dawid_skene"] - 0.01


def test_real_data_reproduces_published_figures_d_jn_product(tmp_path):
    _check_published(_real(tmp_path, "d_jn-product"), "d_jn-product")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["s4_Dog_data", "s4_Face_Sentiment_Identification", "d_Duck_Identification"])
def test_real_data_reproduces_published_figures(tmp_path, name):
    _check_published(_real(tmp_path, name), name)


# -------------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------------


def test_malformed_rows_unknown_workers_and_duplicates(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text(
        "task,worker,label\n"
        "t1,w1,yes\n"
        "t1,w2,no\n"
        "t1,w3\n"  # 4: a field missing
        "\n"  # 5: blank line
        "t2,w1,\n"  # 6: empty label
        "t2,w2,yes\n"
        "t1,w1,no\n"  # 8: duplicate of line 2
        "t3,w4,yes,extra\n"  # 9: a field too many
        "t3,w4,yes\n"
        '"t4,x",w1,"no"\n'  # quoted comma: fine
    )
    w = tmp_path / "w.csv"
    w.write_text("worker,group\nw1,a\nw2,b\nw1,c\nw9\n")  # w1 twice, w9 malformed; w3/w4 missing
    out, report = _run(
        tmp_path, "out", annotations=str(a), annotators=str(w), method="groupanno", iterations=5
    )
    assert (report["read"], report["used"], report["rejected"]) == (10, 5, 5)
    rejected = pd.read_csv(out / "rejected.csv", dtype=str, keep_default_na=False)
    got = sorted((Path(r.file).name, int(r.line), r.reason.split(" (")[0]) for r in rejected.itertuples())
    assert got == [
        ("a.csv", 4, "field count: expected 3, got 2"),
        ("a.csv", 5, "blank line"),
        ("a.csv", 6, "empty label"),
        ("a.csv", 8, "duplicate task/worker pair"),
        ("a.csv", 9, "field count: expected 3, got 4"),
        ("w.csv", 4, "duplicate worker"),
        ("w.csv", 5, "field count: expected 2, got 1"),
    ]
    dup = rejected[rejected.line == "8"].reason.item()
    assert dup.endswith(f"(first at {a}:2)")
    assert report["unknown_group_workers"] == 1  # w4 (w3's only label was rejected)
    assert report["annotators_file"] == {"read": 4, "used": 2, "rejected": 2}
    annotators = pd.read_csv(out / "annotators.csv", dtype=str).set_index("worker")
    assert annotators.loc["w4", "group"] == "unknown" and annotators.loc["w1", "group"] == "a"
    assert set(_labels(out).index) == {"t1", "t2", "t3", "t4,x"}


def test_majority_vote_ties_break_to_the_smallest_label(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("task,worker,label\nt1,w1,b\nt1,w2,a\nt2,w1,b\nt2,w2,b\nt2,w3,c\n")
    out, _ = _run(tmp_path, "mv", annotations=str(a), method="majority_vote")
    labels = pd.read_csv(out / "labels.csv", dtype=str).set_index("task")
    assert labels.loc["t1", "label"] == "a" and float(labels.loc["t1", "confidence"]) == 0.5
    assert labels.loc["t2", "label"] == "b"


def test_empty_and_header_only_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InputError, match=r"empty\.csv: empty file"):
        _run(tmp_path, "e", annotations=str(empty))
    assert not (tmp_path / "e").exists()
    header = tmp_path / "header.csv"
    header.write_text("task,worker,label\n")
    out, report = _run(tmp_path, "h", annotations=str(header))
    assert (report["read"], report["used"], report["tasks"]) == (0, 0, 0)
    assert (out / "labels.csv").read_text() == "task,label,confidence\n"


def test_groupanno_without_annotators_is_refused_clearly(tmp_path, capsys):
    a = tmp_path / "a.csv"
    a.write_text("task,worker,label\nt1,w1,x\n")
    with pytest.raises(ConfigError, match="needs --annotators"):
        _run(tmp_path, "g", annotations=str(a), method="groupanno")
    code = cli.main(
        [
            "run",
            "crowd-labels",
            "--annotations",
            str(a),
            "--method",
            "groupanno",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "needs --annotators W.csv" in capsys.readouterr().err


def test_contract_command_line(small, tmp_path):
    out = tmp_path / "out"
    code = cli.main(
        [
            "run", "crowd-labels", "--annotations", small.annotations, "--annotators", small.annotators,
            "--tasks", small.tasks, "--method", "groupanno", "--output", str(out), "--iterations", "5",
            "--tolerance", "1e-4", "--runner", "FnApiRunner",
        ]
    )  # fmt: skip
    assert code == 0
    for name in [
        "labels.csv", "posteriors.csv", "annotators.csv", "groups.csv", "groups.png", "report.json",
        "rejected.csv", "resolved_config.json",
    ]:  # fmt: skip
        assert (out / name).exists(), name
    assert list(out.glob("tasks-train-*.tfrecord")) and list(out.glob("tasks-eval-*.tfrecord"))
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "groupanno" and report["iterations"] <= 5
    assert len(report["log_likelihood"]) == report["iterations"]
    assert report["tasks_file"]["read"] == report["tasks_file"]["written"] == 600
    header = (out / "labels.csv").read_text().splitlines()[0]
    assert header == "task,label,confidence"
    assert (out / "posteriors.csv").read_text().splitlines()[0] == "task,c0,c1,c2"


@pytest.mark.flink
def test_flink_gives_the_same_result_as_fnapi(small, tmp_path, flink):
    common = dict(
        annotations=small.annotations,
        annotators=small.annotators,
        tasks=small.tasks,
        method="groupanno",
        iterations=5,
    )
    local, local_report = _run(tmp_path, "local", **common)
    out = tmp_path / "flink"
    run_pipeline(
        build_crowd_labels,
        CrowdConfig(output=str(out), **common),
        runner="FlinkRunner",
        beam_args=[*flink, "--parallelism=2"],
    )
    flink_report = json.loads((out / "report.json").read_text())
    assert flink_report == local_report
    a, b = _posteriors(out).sort_index(), _posteriors(local).sort_index()
    assert list(a.index) == list(b.index)
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=0, atol=1e-12)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in local.iterdir())
