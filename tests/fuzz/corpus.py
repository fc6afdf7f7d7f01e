"""A generator of hostile inputs for every pipeline, and the contract a run on each must keep.

Each `Case` writes one input folder (a hostile file beside good ones, or a hostile file alone) and names
the CLI command that reads it. `check` runs it in-process and asserts what every pipeline promises:

* the run exits 0, and its report reconciles (``read = written + rejected``), or
* no input at all is usable and it exits 1 with one line naming the file;
* either way no traceback is printed, and a failed run leaves no output.

The kinds of damage are what real logs and scanners produce: empty, zero- and one-byte files, binary
noise, UTF-16 and Latin-1 text, 10 MB lines, NUL bytes, every field empty, values at the integer
limits, truncated gzip/bzip2/zstd archives, repeated headers, CRLF line ends, duplicated files; for CT,
DICOM with each geometry attribute malformed or missing, pixel data shorter than Rows x Columns,
truncated DICOM, NIfTI with NaN voxels or a zero voxel size.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import logging
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zstandard

__all__ = ["CASES", "SAMPLE", "Case", "check", "edit_dicom", "write_series"]


@dataclasses.dataclass(frozen=True)
class Case:
    pipeline: str
    name: str
    write: Callable[[Path], list[str]]  # writes the inputs under a folder; returns the CLI flags
    alone: bool = False  # only the hostile input: exit 1 is allowed when nothing is usable

    @property
    def id(self) -> str:
        return f"{self.pipeline}:{self.name}{':alone' if self.alone else ''}"


# -------------------------------------------------------------------------------------------------
# Good inputs
# -------------------------------------------------------------------------------------------------

EXAMPLE_HEADER = b"id,x0,x1,x2,x3,tokens,label"
CROWD_HEADER = b"task,worker,label"


def _example_lines(n: int = 200, seed: int = 0) -> list[bytes]:
    from headrace.pipelines.example import generate_lines

    return [line.text.encode() for line in generate_lines(seed, 0, n, 0)]


def _ctr_lines(n: int = 300, seed: int = 0, tmp: Path | None = None) -> list[bytes]:
    from headrace.pipelines.ctr_data import generate

    rng = np.random.default_rng(seed)
    path = (tmp or Path("/tmp")) / f".ctr-good-{seed}-{rng.integers(1 << 30)}.tsv"
    generate(path, n, seed=seed)
    lines = path.read_bytes().splitlines()
    path.unlink()
    return lines


def _crowd_lines(n: int = 300, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [b"t%d,w%d,%s" % (i // 3, rng.integers(20), rng.choice([b"a", b"b", b"c"])) for i in range(n)]


GOOD: dict[str, tuple[bytes | None, Callable[..., list[bytes]], bytes]] = {
    # pipeline: (header line, good lines, delimiter)
    "example": (EXAMPLE_HEADER, _example_lines, b","),
    "ctr-ingest": (None, _ctr_lines, b"\t"),
    "crowd-labels": (CROWD_HEADER, _crowd_lines, b","),
}


def _text(header: bytes | None, lines: list[bytes], end: bytes = b"\n") -> bytes:
    return b"".join(line + end for line in ([header] if header else []) + lines)


def _flags(pipeline: str, folder: Path) -> list[str]:
    pattern = str(folder / "*")
    if pipeline == "example":
        return ["--input", pattern]
    if pipeline == "ctr-ingest":
        return ["--input", pattern, "--shards", "2", "--min-count", "1"]
    return ["--annotations", pattern, "--method", "majority_vote"]


# -------------------------------------------------------------------------------------------------
# Hostile text files: (name, bytes from (header, good lines, delimiter))
# -------------------------------------------------------------------------------------------------


def _truncated(compress: Callable[[bytes], bytes]) -> Callable:
    def make(header, lines, sep):
        data = compress(_text(header, lines * 20))
        return data[: len(data) // 2]

    return make


def _int_limits(header, lines, sep):
    fields = lines[0].split(sep)
    out = []
    for value in (b"9223372036854775807", b"-9223372036854775808", b"9223372036854775808", b"1e309", b"nan"):
        row = list(fields)
        for k in range(1, min(len(row), 14)):
            row[k] = value
        out.append(sep.join(row))
    return _text(header, out + lines[:5])


TEXT_DAMAGE: list[tuple[str, str, Callable]] = [
    ("empty", ".txt", lambda h, lines, s: b""),
    ("one-byte", ".txt", lambda h, lines, s: b"x"),
    ("newline-only", ".txt", lambda h, lines, s: b"\n"),
    ("binary-noise", ".txt", lambda h, lines, s: np.random.default_rng(1).bytes(64 << 10)),
    ("utf16", ".txt", lambda h, lines, s: _text(h, lines[:20]).decode().encode("utf-16")),
    (
        "latin1-field",
        ".txt",
        lambda h, lines, s: _text(
            h, [*lines[:10], lines[10].replace(s, "café".encode("latin-1") + s, 1), *lines[11:20]]
        ),
    ),
    ("long-line", ".txt", lambda h, lines, s: _text(h, [*lines[:5], b"x" * (10 << 20), *lines[5:10]])),
    (
        "nul-bytes",
        ".txt",
        lambda h, lines, s: _text(h, [*lines[:5], lines[5][:3] + b"\x00\x00" + lines[5][3:], *lines[6:10]]),
    ),
    ("all-fields-empty", ".txt", lambda h, lines, s: _text(h, [s * (lines[0].count(s))] * 5 + lines[:5])),
    ("integer-limits", ".txt", _int_limits),
    ("truncated-gzip", ".txt.gz", _truncated(gzip.compress)),
    ("truncated-bzip2", ".txt.bz2", _truncated(lambda b: bz2.compress(b, compresslevel=1))),
    ("truncated-zstd", ".txt.zst", _truncated(lambda b: zstandard.ZstdCompressor().compress(b))),
    ("gzip-without-extension", ".txt", lambda h, lines, s: gzip.compress(_text(h, lines[:20]))),
    ("repeated-header", ".txt", lambda h, lines, s: _text(h, lines[:10] + ([h] if h else []) + lines[10:20])),
    ("crlf", ".txt", lambda h, lines, s: _text(h, lines[:20], end=b"\r\n")),
    ("blank-lines", ".txt", lambda h, lines, s: _text(h, [*lines[:5], b"", b"  ", *lines[5:10]])),
]


def _text_case(pipeline: str, name: str, suffix: str, make: Callable, alone: bool) -> Case:
    def write(folder: Path) -> list[str]:
        header, good, sep = GOOD[pipeline]
        lines = good(seed=3) if pipeline != "ctr-ingest" else good(seed=3, tmp=folder.parent)
        folder.mkdir(parents=True)
        if not alone:
            (folder / "good.txt").write_bytes(_text(header, lines))
        (folder / f"hostile{suffix}").write_bytes(make(header, lines, sep))
        return _flags(pipeline, folder)

    return Case(pipeline, name, write, alone)


def _duplicated_case(pipeline: str) -> Case:
    def write(folder: Path) -> list[str]:
        header, good, _sep = GOOD[pipeline]
        lines = good(seed=4) if pipeline != "ctr-ingest" else good(seed=4, tmp=folder.parent)
        folder.mkdir(parents=True)
        (folder / "a.txt").write_bytes(_text(header, lines))
        shutil.copy(folder / "a.txt", folder / "copy-of-a.txt")
        return _flags(pipeline, folder)

    return Case(pipeline, "duplicated-file", write)


# -------------------------------------------------------------------------------------------------
# Hostile CT inputs
# -------------------------------------------------------------------------------------------------

MALFORMED_DICOM = [
    ("ImagePositionPatient", [1.0, 2.0]),
    ("ImagePositionPatient", None),
    ("ImageOrientationPatient", [1.0, 0.0, 0.0, 0.0, 1.0]),
    ("ImageOrientationPatient", None),
    ("PixelSpacing", [0.7]),
    ("PixelSpacing", [0.0, 0.7], "zero"),
    ("PixelSpacing", None),
    ("RescaleSlope", "abc"),
    ("RescaleIntercept", "nan"),
    ("Rows", 0),
    ("Columns", None),
    ("BitsAllocated", 12),
    ("BitsStored", 20),
    ("SamplesPerPixel", 3),
    ("SeriesInstanceUID", None),
]


def write_series(folder: Path, seed: int = 0) -> list[str]:
    """A small regular CT series (4 slices of 12 x 10), one file per slice in slice order."""
    from headrace.pipelines import ct_data

    hu = ct_data.phantom((4, 12, 10), seed=seed).hu
    return ct_data.write_dicom_series(folder, hu, seed=seed, shuffle_names=False)[1]


def edit_dicom(path: str, keyword: str, value) -> None:
    """Sets (or, for None, deletes) one attribute as a broken scanner would write it."""
    import pydicom
    from pydicom import config
    from pydicom.dataelem import DataElement

    ds = pydicom.dcmread(path)
    if value is None:
        del ds[keyword]
    else:
        modes = config.settings.reading_validation_mode, config.settings.writing_validation_mode
        config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.IGNORE
        try:
            if value == "abc":  # not a decimal string at all: held as text
                tag = ds.data_element(keyword).tag
                ds[tag] = DataElement(tag, "LO", value)
            else:
                setattr(ds, keyword, value)
        finally:
            config.settings.reading_validation_mode, config.settings.writing_validation_mode = modes
    ds.save_as(path, enforce_file_format=True)


def _ct_case(name: str, damage: Callable[[Path], None], alone: bool = False) -> Case:
    def write(folder: Path) -> list[str]:
        folder.mkdir(parents=True)
        if not alone:
            write_series(folder / "good", seed=1)
        damage(folder / "hostile")
        return ["--input", str(folder), "--shards", "1"]

    return Case("ct-ingest", name, write, alone)


def _malformed(keyword: str, value) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        files = write_series(folder, seed=2)
        edit_dicom(files[1], keyword, value)

    return damage


def _short_pixels(folder: Path) -> None:
    import pydicom

    files = write_series(folder, seed=3)
    ds = pydicom.dcmread(files[2])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(files[2], enforce_file_format=True)


def _truncated_dicom(folder: Path) -> None:
    files = write_series(folder, seed=4)
    data = Path(files[0]).read_bytes()
    Path(files[0]).write_bytes(data[: len(data) // 3])


def _file(data: bytes, name: str = "blob") -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / name).write_bytes(data)

    return damage


def _nifti_nan(folder: Path) -> None:
    from headrace.pipelines import ct_data

    volume = ct_data.phantom((4, 6, 5), seed=5).hu.astype(np.float32)
    volume[1, 2, 3] = np.nan
    ct_data.write_nifti(folder / "nan.nii.gz", volume, dtype=np.float32)


def _nifti_zero_spacing(folder: Path) -> None:
    from headrace.pipelines import ct_data

    path = ct_data.write_nifti(folder / "flat.nii", ct_data.phantom((4, 6, 5), seed=6).hu)
    data = bytearray(Path(path).read_bytes())
    struct.pack_into("<f", data, 80, 0.0)  # pixdim[1]
    struct.pack_into("<hh", data, 252, 0, 0)  # no qform/sform: the affine comes from pixdim
    Path(path).write_bytes(bytes(data))


def _duplicated_series(folder: Path) -> None:
    files = write_series(folder / "a", seed=7)
    (folder / "b").mkdir(parents=True)
    for f in files:
        shutil.copy(f, folder / "b" / Path(f).name)


CT_DAMAGE: list[tuple[str, Callable[[Path], None]]] = [
    *(
        (f"dicom-{k}-{rest[0] if rest else 'missing' if v is None else 'malformed'}", _malformed(k, v))
        for k, v, *rest in MALFORMED_DICOM
    ),
    ("dicom-short-pixel-data", _short_pixels),
    ("dicom-truncated", _truncated_dicom),
    ("empty-file", _file(b"")),
    ("one-byte-file", _file(b"\x00")),
    ("binary-noise", _file(np.random.default_rng(2).bytes(50_000))),
    ("nifti-nan", _nifti_nan),
    ("nifti-zero-voxel-size", _nifti_zero_spacing),
    ("nifti-garbage", _file(b"\x1f\x8b not really gzip", "broken.nii.gz")),
    ("duplicated-series", _duplicated_series),
]

CASES: list[Case] = [
    *(
        _text_case(pipeline, name, suffix, make, alone)
        for pipeline in GOOD
        for name, suffix, make in TEXT_DAMAGE
        for alone in (False, True)
    ),
    *(_duplicated_case(pipeline) for pipeline in GOOD),
    *(_ct_case(name, damage) for name, damage in CT_DAMAGE),
    _ct_case("binary-noise", _file(np.random.default_rng(3).bytes(4096)), alone=True),
]

# The sample CI runs: one case per defect the hardening issue lists, and a few alone.
SAMPLE = [
    "ctr-ingest:binary-noise",
    "ctr-ingest:latin1-field",
    "ctr-ingest:truncated-gzip",
    "ctr-ingest:binary-noise:alone",
    "crowd-labels:latin1-field",
    "crowd-labels:utf16:alone",
    "crowd-labels:repeated-header",
    "crowd-labels:truncated-zstd",
    "example:long-line",
    "example:nul-bytes",
    "ct-ingest:dicom-ImagePositionPatient-malformed",
    "ct-ingest:dicom-short-pixel-data",
    "ct-ingest:nifti-nan",
]


# -------------------------------------------------------------------------------------------------
# The contract
# -------------------------------------------------------------------------------------------------


def _reconciles(pipeline: str, report: dict) -> None:
    if pipeline in ("example", "ctr-ingest"):
        assert report["read"] == report["train"] + report["eval"] + report["rejected"], report
    elif pipeline == "crowd-labels":
        assert report["read"] == report["used"] + report["rejected"], report
    else:
        assert report["files"] == report["files_in_volumes"] + report["files_rejected"], report


def check(case: Case, tmp: Path, capsys) -> dict | None:
    """Runs `case` through the CLI in this process; asserts the contract; returns the report (None when
    the run exited 1 because nothing was usable)."""
    from headrace.runners import cli

    folder, out = tmp / "in", tmp / "out"
    # The CLI's log handler of the case before writes to that case's (closed) captured stderr: rebind it
    # before the inputs are written (pydicom logs while writing broken values).
    logging.basicConfig(force=True, stream=sys.stderr)
    flags = case.write(folder)
    code = cli.main(["run", case.pipeline, *flags, "--output", str(out)])
    captured = capsys.readouterr()
    both = captured.out + captured.err
    assert "Traceback" not in both, both[-4000:]
    if code == 1 and case.alone:
        errors = [line for line in captured.err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("headrace: error: "), captured.err[-2000:]
        assert str(folder) in errors[0], errors[0]  # names the file
        assert not out.exists() and not list(tmp.glob(".out*"))  # nothing half-written
        return None
    assert code == 0, captured.err[-3000:]
    report = json.loads((out / "report.json").read_text())
    _reconciles(case.pipeline, report)
    return report
