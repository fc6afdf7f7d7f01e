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


def test_fixed_sums_are_exact_and_order_free():
    """Float sums depend on the order a runner combines in; `Fixed` sums do not, and equal math.fsum."""
    import math

    import numpy as np

    from headrace.transforms.counting import Fixed, SumArrays

    rng = np.random.default_rng(0)
    terms = [rng.random((4, 3)) * 10.0 ** rng.integers(-12, 6) * rng.choice([-1, 1]) for _ in range(300)]
    exact = np.array([[math.fsum(t[i, j] for t in terms) for j in range(3)] for i in range(4)])
    sums = set()
    for seed in range(4):
        order = np.random.default_rng(seed).permutation(len(terms))
        total = Fixed.of(terms[order[0]])
        for i in order[1:]:
            total = total + Fixed.of(terms[i])
        sums.add(total.to_float().tobytes())
    assert len(sums) == 1
    np.testing.assert_array_equal(np.frombuffer(sums.pop()).reshape(4, 3), exact)
    # float addition in two orders differs in the last bits (what the cluster test saw)
    assert np.sum(terms, axis=0).tobytes() != np.sum(terms[::-1], axis=0).tobytes()
    # SumArrays over split accumulators == one pass
    fn = SumArrays()
    halves = [fn.create_accumulator(), fn.create_accumulator()]
    for i, t in enumerate(terms):
        halves[i % 2] = fn.add_input(halves[i % 2], t)
    np.testing.assert_array_equal(fn.extract_output(fn.merge_accumulators(halves[::-1])), exact)
    with pytest.raises(ValueError, match="non-finite"):
        Fixed.of([1.0, float("nan")])


def test_sorted_text_is_the_same_whatever_the_order(tmp_path, fnapi_pipeline):
    from headrace.transforms.io import WriteSortedText

    rows = [(f"t{i:03d}", f"t{i:03d},{i % 7}") for i in range(50)]
    texts = []
    for i, order in enumerate([rows, rows[::-1]]):
        with fnapi_pipeline() as p:
            (
                p
                | beam.Create(order, reshuffle=True)
                | WriteSortedText(str(tmp_path / f"{i}.csv"), header="task,x")
            )
        texts.append((tmp_path / f"{i}.csv").read_text())
    assert texts[0] == texts[1]
    assert texts[0].splitlines() == ["task,x", *[line for _, line in rows]]
