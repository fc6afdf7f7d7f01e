"""ReadLines (file and line numbers, what it leaves out) and the files it matches."""

from __future__ import annotations

import gzip

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from headrace.core.errors import InputError
from headrace.transforms.io import Line, match_files
from headrace.transforms.textfiles import ReadLines


def test_read_lines_numbers_lines_per_file_and_skips_headers(tmp_path, fnapi_pipeline):
    (tmp_path / "a.csv").write_text("h\nx\ny\n")
    with gzip.open(tmp_path / "b.csv.gz", "wt") as f:
        f.write("h\r\nz\n")
    a, b = str(tmp_path / "a.csv"), str(tmp_path / "b.csv.gz")
    with fnapi_pipeline() as p:
        read = p | ReadLines(str(tmp_path / "*.csv*"), skip_header_lines=1)
        assert_that(read["lines"], equal_to([Line(a, 2, "x"), Line(a, 3, "y"), Line(b, 2, "z")]))
        assert_that(read["rejected"], equal_to([]), label="NoneRejected")


def test_read_lines_rejects_what_is_not_text(tmp_path, fnapi_pipeline):
    (tmp_path / "a.csv").write_bytes(b"h\nx\nca\xe9\ny\n")
    (tmp_path / "b.csv").write_bytes(bytes(range(256)) * 40)
    gz = gzip.compress(b"h\n" + b"".join(b"%d\n" % i for i in range(100_000)))
    (tmp_path / "c.csv.gz").write_bytes(gz[: len(gz) // 2])
    a, b, c = (str(tmp_path / n) for n in ("a.csv", "b.csv", "c.csv.gz"))
    with fnapi_pipeline() as p:
        read = p | ReadLines(str(tmp_path / "*.csv*"), skip_header_lines=1)
        got = read["rejected"] | beam.Map(lambda r: (r.source, r.line, r.reason.split(" (")[0].split(":")[0]))
        assert_that(
            read["lines"] | "A" >> beam.Filter(lambda line: line.path == a),
            equal_to([Line(a, 2, "x"), Line(a, 4, "y")]),
        )
        assert_that(
            got | beam.Map(lambda r: r if r[0] != c else (c, "truncated" in r[2])),
            equal_to([(a, 3, "not UTF-8"), (b, 1, "binary file"), (c, True)]),
            label="Rejected",
        )


def test_read_lines_refuses_a_pattern_without_files(tmp_path, fnapi_pipeline):
    with pytest.raises(InputError, match="no files match"):
        match_files(str(tmp_path / "missing-*.csv"))
