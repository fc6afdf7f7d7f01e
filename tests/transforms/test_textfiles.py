"""Text files as real systems leave them: binary, not UTF-8, NUL bytes, huge lines, truncated archives."""

from __future__ import annotations

import bz2
import gzip

import numpy as np
import pytest
import zstandard

from headrace.transforms.columnar import CsvBatch, iter_csv_batches, read_header
from headrace.transforms.io import Rejected
from headrace.transforms.textfiles import TextReader

COLUMNS = ["task", "worker", "label"]


def _parse(path, **kwargs):
    rows, rejected = [], []
    for item in iter_csv_batches(str(path), COLUMNS, **kwargs):
        if isinstance(item, CsvBatch):
            cols = [item.table.column(c).to_pylist() for c in COLUMNS]
            rows += [(int(n), *values) for n, values in zip(item.lines, zip(*cols))]
        else:
            rejected.append((item.line, item.reason))
    return rows, rejected


def _body(n: int) -> bytes:
    return b"task,worker,label\n" + b"".join(b"t%d,w%d,x\n" % (i, i % 7) for i in range(n))


def test_a_line_that_is_not_utf8_is_rejected_and_the_others_used(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"task,worker,label\nt1,w1,x\nt2,caf\xe9,x\nt3,w\x00,x\nt4,w4,y\n")
    rows, rejected = _parse(path)
    assert rows == [(2, "t1", "w1", "x"), (5, "t4", "w4", "y")]
    assert rejected == [(3, "not UTF-8 (byte 0xe9 at column 7)"), (4, "NUL byte in line")]


def test_a_binary_file_is_rejected_whole_with_one_reason(tmp_path):
    path = tmp_path / "noise.csv"
    path.write_bytes(np.random.default_rng(0).bytes(50_000))
    rows, rejected = _parse(path)
    assert rows == [] and len(rejected) == 1 and rejected[0][0] == 1
    assert "binary" in rejected[0][1] or "not UTF-8" in rejected[0][1]
    utf16 = tmp_path / "u16.csv"
    utf16.write_bytes("task,worker,label\nt1,w1,x\n".encode("utf-16"))
    assert _parse(utf16) == ([], [(1, "UTF-16 text (re-encode it as UTF-8)")])
    assert read_header(str(utf16)) == (None, "UTF-16 text (re-encode it as UTF-8)")
    gz_named_csv = tmp_path / "g.csv"
    gz_named_csv.write_bytes(gzip.compress(_body(3)))
    assert _parse(gz_named_csv)[1] == [(1, "gzip-compressed data in a file without its extension")]


@pytest.mark.parametrize(
    "ext,compress",
    [
        (".gz", gzip.compress),
        (".bz2", lambda b: bz2.compress(b, compresslevel=1)),
        (".zst", lambda b: zstandard.ZstdCompressor().compress(b)),
    ],
)
def test_truncated_archive_keeps_lines_before_the_damage(tmp_path, ext, compress):
    body = _body(40_000)
    data = compress(body)
    path = tmp_path / f"a.csv{ext}"
    path.write_bytes(data[: len(data) // 2])
    rows, rejected = _parse(path)
    assert len(rejected) == 1
    line, reason = rejected[0]
    assert "truncated or corrupt" in reason and f"lines from {line} on are lost" in reason
    assert line > 10_000  # bzip2 gives out whole 100 kB blocks only; gzip and zstd nearly every byte
    # Every line before the damage is used, in order, with its own line number; none after it.
    assert len(rows) == line - 2 and rows[-1][0] == line - 1
    assert [r[1] for r in rows] == [f"t{i}" for i in range(line - 2)]
    whole = tmp_path / f"b.csv{ext}"
    whole.write_bytes(data)
    rows, rejected = _parse(whole)
    assert len(rows) == 40_000 and rejected == []


def test_a_line_over_the_limit_is_rejected_and_the_next_one_read(tmp_path):
    path = tmp_path / "long.csv"
    path.write_bytes(b"task,worker,label\nt1,w1,x\nt2," + b"w" * (10 << 20) + b",x\nt3,w3,z\r\n")
    rows, rejected = _parse(path)
    assert rows == [(2, "t1", "w1", "x"), (4, "t3", "w3", "z")]
    assert rejected == [(3, "line longer than 1048576 bytes")]


def test_repeated_headers_blank_lines_and_crlf(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_bytes(b"task,worker,label\r\nt1,w1,x\r\n\r\ntask,worker,label\r\nt2,w2,y\r\n")
    rows, rejected = _parse(path)
    # A blank line reads as a row of empty fields (rejected as "blank line" by the pipelines' checks).
    assert rows == [(2, "t1", "w1", "x"), (3, "", "", ""), (5, "t2", "w2", "y")]
    assert rejected == [(4, "repeated header line")]


def test_empty_and_one_byte_files(tmp_path):
    for data, expected in [
        (b"", "empty file"),
        (b"\n", "empty file"),
        (b"\x00", "binary file (1 control bytes"),
    ]:
        path = tmp_path / "f.csv"
        path.write_bytes(data)
        header, why = read_header(str(path))
        assert header is None and why.startswith(expected)
        rows, rejected = _parse(path)
        assert rows == [] and len(rejected) == 1


def test_reader_lines_keep_file_line_numbers(tmp_path):
    path = tmp_path / "a.txt.gz"
    path.write_bytes(gzip.compress(b"one\ntw\xffo\nthree\r\nfour"))
    with TextReader(str(path)) as reader:
        assert list(reader.lines()) == [(1, "one"), (3, "three"), (4, "four")]
        assert reader.rejections() == [
            Rejected(str(path), 2, "not UTF-8 (byte 0xff at column 3)", "tw\\xffo")
        ]
