"""Every pipeline on every hostile input of the corpus: exit 0 with a reconciled report (or 1 with one line
naming the file when nothing is usable), never a traceback. CI runs `SAMPLE`; the whole corpus is slow."""

from __future__ import annotations

import pytest

from .corpus import CASES, SAMPLE, check

BY_ID = {case.id: case for case in CASES}


def test_the_sample_names_cases_of_the_corpus():
    assert set(SAMPLE) <= set(BY_ID) and len(BY_ID) == len(CASES)


@pytest.mark.parametrize("case_id", SAMPLE)
def test_sample(case_id, tmp_path, capsys):
    check(BY_ID[case_id], tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.id not in SAMPLE])
def test_whole_corpus(case_id, tmp_path, capsys):
    check(BY_ID[case_id], tmp_path, capsys)


def test_what_the_sample_rejects_and_keeps(tmp_path, capsys):
    # Not just "no crash": the good lines are all used, the bad line is rejected with its reason.
    report = check(BY_ID["ctr-ingest:latin1-field"], tmp_path / "a", capsys)
    assert report["rejected_reasons"] == {"not UTF-8": 1}
    assert report["train"] + report["eval"] == 300 + 19  # good.txt, and the hostile file's other lines
    report = check(BY_ID["crowd-labels:repeated-header"], tmp_path / "b", capsys)
    assert report["rejected_reasons"]["repeated header line"] == 1
    report = check(BY_ID["ctr-ingest:truncated-gzip"], tmp_path / "c", capsys)
    assert report["rejected_reasons"] == {"truncated or corrupt gzip data": 1}
    assert report["train"] + report["eval"] > 300 + 2000  # the lines before the damage are used
