"""ctr-ingest: every line in exactly one output, statistics equal pandas, Parquet = TSV, Flink = FnApiRunner."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from headrace.pipelines.ctr import CTR_SPEC, CtrIngestConfig, build_ctr_ingest, dataset
from headrace.pipelines.ctr_data import CAT_FIELDS, INT_FIELDS, generate
from headrace.runners.beam_runner import run_pipeline
from headrace.transforms.tfrecord import read_examples

BAD_LINES = [
    ("1\t2\t3", "field count: expected 40, got 3"),
    ("2" + "\t" * 39, "label: expected 0 or 1, got '2'"),
    ("0\t1\tx" + "\t" * 37, "I2: not an integer, got 'x'"),
    ("1\t1.5" + "\t" * 38, "I1: not an integer, got '1.5'"),
    ("", "blank line"),
]


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    """4000 generated lines with the hand-written bad lines spread among them."""
    root = tmp_path_factory.mktemp("ctr")
    data = generate(root / "gen.tsv", 4000, seed=1)
    lines = Path(data.path).read_text().splitlines()
    for k, (bad, _) in enumerate(BAD_LINES):
        lines.insert(500 * (k + 1), bad)
    path = root / "log.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def ingested(log, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ctr-out") / "out"
    run_pipeline(build_ctr_ingest, CtrIngestConfig(input=str(log), output=str(out), shards=4, min_count=3))
    return out


def _line(example: dict) -> str:
    ints = ["" if m else str(v) for v, m in zip(example["I"], example["I_missing"])]
    cats = [bytes(c).decode() for c in example["C"]]
    return "\t".join([str(int(example["label"])), *ints, *cats])


def _lines(out: Path, split: str) -> list[str]:
    return [_line(e) for e in read_examples(str(out / f"{split}-*.tfrecord"), CTR_SPEC)]


def test_every_line_lands_in_exactly_one_output(log, ingested):
    source = log.read_text().splitlines()
    bad_numbers = {i + 1 for i, line in enumerate(source) if line in {b for b, _ in BAD_LINES}}
    good = Counter(line for i, line in enumerate(source) if i + 1 not in bad_numbers)
    train, evals = _lines(ingested, "train"), _lines(ingested, "eval")
    assert Counter(train) + Counter(evals) == good
    rejected = [
        json.loads(x)
        for x in (ingested / "rejected" / "rejected-00000-of-00001.jsonl").read_text().splitlines()
    ]
    assert sorted((r["line"], r["reason"]) for r in rejected) == sorted(
        (source.index(bad) + 1 if bad else next(i + 1 for i, s in enumerate(source) if s == ""), reason)
        for bad, reason in BAD_LINES
    )
    report = json.loads((ingested / "report.json").read_text())
    assert report["read"] == len(source) == report["train"] + report["eval"] + report["rejected"]
    assert (report["train"], report["eval"], report["rejected"]) == (len(train), len(evals), len(BAD_LINES))
    assert 0.07 < report["eval"] / (report["train"] + report["eval"]) < 0.13


def test_statistics_equal_pandas_on_the_train_split(log, ingested):
    df = pd.read_csv(
        log, sep="\t", header=None, dtype=str, keep_default_na=False, quoting=3, skip_blank_lines=False
    )
    df.columns = ["label", *INT_FIELDS, *CAT_FIELDS][: df.shape[1]]
    df = df.dropna()  # short lines (rejected) have missing trailing columns
    lines = df.apply(lambda r: "\t".join(r), axis=1)
    train = df[lines.isin(set(_lines(ingested, "train")))]
    stats = json.loads((ingested / "stats.json").read_text())
    assert stats["split"] == "train" and stats["min_count"] == 3
    for name in (*INT_FIELDS, *CAT_FIELDS):
        col = train[name]
        present = col[col != ""]
        counts = present.value_counts()
        got = stats["fields"][name]
        assert got["count"] == len(train), name
        assert got["missing"] == int((col == "").sum()), name
        assert got["distinct"] == len(counts), name
        assert got["kept"] == int((counts >= 3).sum()), name
        expected_top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        assert [tuple(t) for t in got["top"]] == [(v, int(c)) for v, c in expected_top], name
        if name in INT_FIELDS:
            x = np.log1p(np.maximum(present.astype(np.int64), 0))
            assert got["log1p_mean"] == pytest.approx(x.mean(), rel=1e-12)
            assert got["log1p_min"] == pytest.approx(x.min()) and got["log1p_max"] == pytest.approx(x.max())
        else:
            vocab = pd.read_csv(
                ingested / "vocab" / f"{name}.tsv", sep="\t", header=None, dtype=str, keep_default_na=False
            )
            assert len(vocab) == got["kept"]
            assert set(vocab[0]) == set(counts[counts >= 3].index)


def test_reader_yields_batches_from_the_writers_spec(ingested):
    batch = next(iter(dataset(str(ingested), "train", 64)))
    assert batch["I"].shape == (64, 13) and batch["C"].shape == (64, 26) and batch["label"].shape == (64,)
    assert batch["C"].dtype == tf.string and batch["I_missing"].dtype == tf.int64
    named = next(iter(dataset(str(ingested), "train", 64, named=True)))
    np.testing.assert_array_equal(named["I3"].numpy(), batch["I"][:, 2].numpy())
    np.testing.assert_array_equal(named["C26"].numpy(), batch["C"][:, 25].numpy())
    total = sum(int(b["label"].shape[0]) for b in dataset(str(ingested), "eval", 100))
    assert total == json.loads((ingested / "report.json").read_text())["eval"]


def _shard_contents(out: Path, split: str) -> dict[str, list[str]]:
    return {
        p.name: sorted(_line(e) for e in read_examples(str(p), CTR_SPEC))
        for p in sorted(out.glob(f"{split}-*"))
    }


def test_reruns_gzip_and_parquet_give_the_same_shards_and_statistics(log, ingested, tmp_path):
    gz = tmp_path / "log.tsv.gz"
    with gzip.open(gz, "wt") as f:
        f.write(log.read_text())
    run_pipeline(
        build_ctr_ingest, CtrIngestConfig(input=str(gz), output=str(tmp_path / "gz"), shards=4, min_count=3)
    )
    # The same valid lines (the generated file, without the bad lines) as Parquet: integer columns
    # with missing values become floats with NaN, as pandas writes them.
    df = pd.read_csv(
        log.parent / "gen.tsv", sep="\t", header=None, dtype=str, keep_default_na=False, quoting=3
    )
    df.columns = ["label", *INT_FIELDS, *CAT_FIELDS]
    table = {"label": df.label.astype(int)}
    table.update({c: pd.to_numeric(df[c].replace("", np.nan)) for c in INT_FIELDS})
    table.update({c: df[c].replace("", None) for c in CAT_FIELDS})
    parquet = tmp_path / "log.parquet"
    pd.DataFrame(table).to_parquet(parquet, index=False)
    run_pipeline(
        build_ctr_ingest,
        CtrIngestConfig(
            input=str(parquet), format="parquet", output=str(tmp_path / "pq"), shards=4, min_count=3
        ),
    )
    for split in ("train", "eval"):
        expected = _shard_contents(ingested, split)
        assert _shard_contents(tmp_path / "gz", split) == expected
        assert _shard_contents(tmp_path / "pq", split) == expected
    stats = (ingested / "stats.json").read_text()
    assert (tmp_path / "gz" / "stats.json").read_text() == stats
    assert (tmp_path / "pq" / "stats.json").read_text() == stats
    report = json.loads((tmp_path / "pq" / "report.json").read_text())
    assert report["rejected"] == 0 and report["read"] == len(df)


@pytest.mark.flink
def test_flink_gives_the_same_output(log, ingested, tmp_path, flink):
    out = tmp_path / "flink"
    run_pipeline(
        build_ctr_ingest,
        CtrIngestConfig(input=str(log), output=str(out), shards=4, min_count=3),
        runner="FlinkRunner",
        beam_args=[*flink, "--parallelism=2"],
    )
    for split in ("train", "eval"):
        assert _shard_contents(out, split) == _shard_contents(ingested, split)
    for name in ("stats.json", "report.json"):
        assert (out / name).read_text() == (ingested / name).read_text(), name
    assert sorted(p.name for p in (out / "vocab").iterdir()) == sorted(
        p.name for p in (ingested / "vocab").iterdir()
    )
