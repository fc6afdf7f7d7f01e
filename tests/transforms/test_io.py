"""ReadLines (file and line numbers) and the files it matches."""

from __future__ import annotations

import gzip

import pytest
from apache_beam.testing.util import assert_that, equal_to

from headrace.core.errors import InputError
from headrace.transforms.io import Line, ReadLines, match_files


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
