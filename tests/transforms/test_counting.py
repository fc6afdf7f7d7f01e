"""Counting transforms: counts of several inputs as one dict, totals, reason tallies, reconciliation."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from headrace.transforms.counting import CountAll, ReasonCounts, Total, reconcile
from headrace.transforms.io import Rejected, WriteJson


def test_count_all_counts_each_input_including_empty_ones(tmp_path, fnapi_pipeline):
    with fnapi_pipeline() as p:
        a = p | "A" >> beam.Create(range(5))
        b = p | "B" >> beam.Create([])
        counts = {"a": a, "b": b} | CountAll()
        assert_that(counts, equal_to([{"a": 5, "b": 0}]))
        counts | WriteJson(str(tmp_path / "report.json"))
    assert json.loads((tmp_path / "report.json").read_text()) == {"a": 5, "b": 0}


def test_totals_and_reason_tallies(fnapi_pipeline):
    rejected = [Rejected("f", 1, "field x1: not a number", ""), Rejected("f", 2, "field x1: empty", "")]
    rejected.append(Rejected("f", 3, "blank line", ""))
    with fnapi_pipeline() as p:
        rows = p | "Rows" >> beam.Create([[1, 2], [3]])
        assert_that(rows | "Total" >> Total(len), equal_to([3]), label="CheckTotal")
        empty = p | "Empty" >> beam.Create([])
        assert_that(empty | "None" >> Total(), equal_to([0]), label="CheckEmpty")
        reasons = p | "Rejected" >> beam.Create(rejected) | "Reasons" >> ReasonCounts()
        assert_that(reasons, equal_to([{"field x1": 2, "blank line": 1}]), label="CheckReasons")


def test_reconcile_names_the_counts_that_do_not_add_up():
    reconcile({"read": 5, "train": 3, "rejected": 2}, "read", ("train", "rejected"))
    with pytest.raises(
        RuntimeError, match=r"read != train \+ rejected: \{'read': 5, 'train': 3, 'rejected': 1\}"
    ):
        reconcile({"read": 5, "train": 3, "rejected": 1}, "read", ("train", "rejected"))
