"""text-ingest: packing as seqio packs, the vocabulary learned once, rejects, and counts that reconcile."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import textwrap

import numpy as np
import pytest

from headrace.pipelines.text import TextIngestConfig, build_text_ingest, dataset, pack, read_document
from headrace.runners.beam_runner import run_pipeline


def _documents(rows) -> list[list[int]]:
    """The document pieces of packed rows (a document longer than a row spans rows), checked."""
    pieces = []
    for row in rows:
        for s in range(1, int(row["segment_ids"].max()) + 1):
            at = row["segment_ids"] == s
            assert np.array_equal(row["positions"][at], np.arange(at.sum()))  # positions restart per piece
            assert np.flatnonzero(at).ptp() == at.sum() - 1  # a piece is contiguous
            pieces.append(row["tokens"][at].tolist())
    return pieces


def test_pack_keeps_documents_whole_unless_longer_than_a_row():
    docs = [[1] * 5, [2] * 3, [3] * 10, [4] * 2, [5] * 6]
    rows = list(pack(docs, 8))
    # [1x5, 2x3] [3x8] [3x2, 4x2] [5x6]: doc 2 (10 ids) fills a row, its rest continues; nothing else splits.
    assert [r["tokens"].tolist() for r in rows] == [
        [1, 1, 1, 1, 1, 2, 2, 2],
        [3] * 8,
        [3, 3, 4, 4, 0, 0, 0, 0],
        [5, 5, 5, 5, 5, 5, 0, 0],
    ]
    assert rows[0]["segment_ids"].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]
    assert rows[2]["segment_ids"].tolist() == [1, 1, 2, 2, 0, 0, 0, 0]
    assert rows[2]["positions"].tolist() == [0, 1, 0, 1, 0, 0, 0, 0]
    assert sum(len(p) for p in _documents(rows)) == sum(len(d) for d in docs)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """Text the installed packages ship (module sources and docstrings), plus files that are not text."""
    root = tmp_path_factory.mktemp("text")
    src = root / "in"
    src.mkdir()
    for module in (argparse, dataclasses, inspect, json, textwrap):
        (src / f"{module.__name__}.txt").write_text(inspect.getsource(module))
    (src / "noise.txt").write_bytes(np.random.default_rng(0).bytes(4096))
    (src / "empty.txt").write_bytes(b"")
    (src / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    out = root / "out"
    config = TextIngestConfig(
        input=str(src / "*.txt"), output=str(out), vocab_size=512, seq_len=64, eval_fraction=0.2, shards=2
    )
    run_pipeline(build_text_ingest, config)
    return src, out, config


def test_documents_reconcile_and_bad_files_are_rejected(ingested):
    _src, out, _ = ingested
    report = json.loads((out / "report.json").read_text())
    assert report["documents"] == 8 and report["tokenized"] == 5 and report["rejected"] == 3
    assert set(report["rejected_reasons"]) == {"binary file", "empty file", "not UTF-8"}
    rejected = [
        json.loads(line) for f in (out / "rejected").glob("*.jsonl") for line in f.read_text().splitlines()
    ]
    assert {r["source"].rsplit("/", 1)[-1] for r in rejected} == {"noise.txt", "empty.txt", "latin1.txt"}
    assert (out / "tokenizer.model").is_file() and (out / "spec.json").is_file()


def test_rows_hold_every_token_of_every_document(ingested):
    import sentencepiece as spm

    src, out, config = ingested
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    expected = sorted(
        [*sp.encode(doc), sp.eos_id()]
        for doc in (read_document(str(p)) for p in sorted(src.glob("*.txt")))
        if isinstance(doc, str)
    )
    rows = []
    for split in ("train", "eval"):
        for batch in dataset(str(out), split, 4).as_numpy_iterator():
            assert batch["tokens"].shape[1] == config.seq_len
            rows += [{k: v[i] for k, v in batch.items()} for i in range(len(batch["tokens"]))]
    pieces = _documents(rows)
    report = json.loads((out / "report.json").read_text())
    assert sum(len(p) for p in pieces) == report["tokens"] == sum(len(d) for d in expected)
    flat = sorted(tok for p in pieces for tok in p)
    assert flat == sorted(tok for d in expected for tok in d)
    assert report["train_rows"] + report["eval_rows"] == len(rows) and 0.5 < report["packing_efficiency"] <= 1
