"""ReadLines (file and line numbers), CountAll, WriteJson."""

from __future__ import annotations

import gzip
import json

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from headrace.runners.errors import InputError
from headrace.transforms.io import CountAll, Line, ReadLines, WriteJson, match_files


def test_read_lines_numbers_lines_per_file_and_skips_headers(tmp_path, fnapi_pipeline):
    (tmp_path / "a.csv").write_text("h\nx\ny\n")
    with gzip.open(tmp_path / "b.csv.gz", "wt") as f:
        f.write("h\r\nz\n")
    a, b = str(tmp_path / "a.csv"), str(tmp_path / "b.csv.gz")
    with fnapi_pipeline() as p:
        lines = p | ReadLines(str(tmp_path / "*.csv*"), skip_header_lines=1)
        assert_that(lines, equal_to([Line(a, 2, "x"), Line(a, 3, "y"), Line(b, 2, "z")]))


def test_read_lines_refuses_a_pattern_without_files(tmp_path, fnapi_pipeline):
    with pytest.raises(InputError, match="no files match"):
        match_files(str(tmp_path / "missing-*.csv"))


def test_count_all_counts_each_input_including_empty_ones(tmp_path, fnapi_pipeline):
    with fnapi_pipeline() as p:
        a = p | "A" >> beam.Create(range(5))
        b = p | "B" >> beam.Create([])
        counts = {"a": a, "b": b} | CountAll()
        assert_that(counts, equal_to([{"a": 5, "b": 0}]))
        counts | WriteJson(str(tmp_path / "report.json"))
    assert json.loads((tmp_path / "report.json").read_text()) == {"a": 5, "b": 0}
