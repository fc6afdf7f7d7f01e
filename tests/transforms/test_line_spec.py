"""Line specs: the writer's lines, the reader's checks naming the field, and the batched parser agree."""

from __future__ import annotations

import numpy as np
import pytest

from headrace.models.criteo import FIELDS
from headrace.pipelines.ctr_stream import EXAMPLE_LINE, Impression, example_line
from headrace.runners.train_ctr_online import parse_examples
from headrace.transforms.line_spec import Column, LineSpec

SPEC = LineSpec(
    "t", [Column("label", "int", choices=("0", "1")), Column("w", "float", positive=True), Column("s")]
)


def test_format_then_parse_gives_the_values_back():
    lines = [SPEC.format([1, 0.5, "a b"]).encode(), SPEC.format([0, 2.0, ""]).encode()]
    assert lines[0] == b"1\t0.5\ta b"
    assert all(SPEC.problem(line) is None for line in lines)
    parsed = {k: v.numpy() for k, v in SPEC.parse(lines).items()}
    assert parsed["label"].tolist() == [1, 0] and parsed["w"].tolist() == [0.5, 2.0]
    assert parsed["s"].tolist() == [b"a b", b""]


@pytest.mark.parametrize(
    "line, problem",
    [
        (b"1\t0.5", "expected 3 fields, got 2"),
        (b"2\t0.5\tx", "label: expected one of 0/1, got '2'"),
        (b"1\t-1\tx", "w: must be > 0, got '-1'"),
        (b"1\tnan\tx", "w: not finite: 'nan'"),
        (b"1\theavy\tx", "w: not a number: 'heavy'"),
        (b"1\t1\t\xff", "not UTF-8"),
    ],
)
def test_problems_name_the_field(line, problem):
    assert SPEC.problem(line) == problem


def test_the_join_writes_what_the_online_trainer_reads():
    fields = tuple(f"v{k}" if k % 3 else "" for k in range(len(FIELDS)))
    lines = [
        example_line(Impression("r1", 5, fields), 1, 1.0),
        example_line(Impression("r2", 6, fields), 0, 4.0),
    ]
    assert all(EXAMPLE_LINE.problem(line) is None for line in lines)
    got, labels, weights = parse_examples([line.encode() for line in lines])
    assert labels.numpy().tolist() == [1.0, 0.0] and weights.numpy().tolist() == [1.0, 4.0]
    assert [got[name].numpy()[0].decode() for name in FIELDS] == list(fields)
    assert np.all(got["C26"].numpy() == np.array([fields[-1].encode()] * 2))
