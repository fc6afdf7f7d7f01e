"""Text files as real systems leave them: compressed, truncated, binary, badly encoded, with huge lines.

`TextReader` reads one file (decompressed by its extension: .gz, .bz2, .zst, .lz4) and hands on only what
a text parser can take, keeping the line numbers of the file:

* a file that is not text (more than 5% control bytes such as NUL in its first 8 KiB, a UTF-16
  byte-order mark, or the magic number of a compressed format under another extension) is refused whole, with one reason (`binary`);
* a line with bytes that are not UTF-8, a NUL byte, or more than `max_line_bytes` bytes is replaced by an
  empty line and recorded with its number and reason (`replaced`), so the parser's line count stays
  the file's and every other line is used;
* compressed data that ends early or is corrupt ends the read at the last complete line before the
  damage, recorded as one rejection "from line N on" (`damage`). Beam's own decompressing reader
  returns truncated gzip, bzip2 and zstd data without an error (measured: half a gzip file read as 148 kB
  of lines, silently), and Arrow's drops the whole buffer it was filling when it meets the damage; here
  the stream decompressors of zlib, bz2 and zstandard are fed the file piece by piece, so every byte
  before the damage is kept and the end of the stream is checked (multi-member gzip and multi-frame
  zstd included).

The fast path, a chunk that is valid UTF-8 without NUL bytes, costs one decode and one count of newlines
per MiB; only a chunk with a bad line is split into lines.
"""

from __future__ import annotations

import bz2
import io
import zlib
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from headrace.transforms.io import Line, Rejected, match_files

__all__ = ["CODECS", "ReadLines", "TextReader"]

CODECS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}
_CHUNK = 1 << 20
_SNIFF = 8192


def _preview(data: bytes, limit: int = 200) -> str:
    return data[:limit].decode("utf-8", errors="backslashreplace")


_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\r\f\v\x1b")


def _why_binary(head: bytes, path: str) -> str | None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 text (re-encode it as UTF-8)"
    for magic, name in _MAGIC.items():
        if head.startswith(magic) and not any(path.endswith(ext) for ext in CODECS):
            return f"{name}-compressed data in a file without its extension"
    # Text with a stray NUL or control byte is text with a bad line; a file of them is not text.
    control = len(head) - len(head.translate(None, _CONTROL))
    if head and control > 0.05 * len(head):
        return f"binary file ({control} control bytes in its first {len(head)}, the first at byte " + (
            f"{min(head.find(bytes([b])) for b in _CONTROL if bytes([b]) in head)})"
        )
    return None


def _decompressor(codec: str):
    if codec == "gzip":
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if codec == "bz2":
        return bz2.BZ2Decompressor()
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


def _decompress(raw, codec: str) -> Iterator[bytes]:
    """The decompressed bytes of `raw`, piece by piece; EOFError when the data ends inside a stream."""
    d = _decompressor(codec)
    started = False
    while True:
        data = raw.read(1 << 16)
        if not data:
            if started and not d.eof:
                raise EOFError(f"the {codec} stream ends before its end marker")
            return
        while data:
            started = True
            out = d.decompress(data)
            if out:
                yield out
            if not d.eof:
                break
            data = d.unused_data  # the next gzip member or zstd frame, if any
            d = _decompressor(codec)
            started = bool(data)


class TextReader(io.RawIOBase):
    """One text file, cleaned for a line parser (see the module docstring). A readable raw stream (for
    Arrow's CSV reader) and a line iterator (`lines`); after reading, `binary`, `replaced` and `damage`
    say what was left out."""

    def __init__(self, path: str, *, max_line_bytes: int = 1 << 20, first_line: int = 1):
        super().__init__()
        self.path, self.max_line_bytes = path, max_line_bytes
        self.binary: str | None = None  # why the whole file was refused
        self.replaced: dict[int, Rejected] = {}  # line number -> why that line was left out
        self.damage: Rejected | None = None  # where compressed data ended early
        self._first_line = first_line
        self._raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
        self.codec = next((c for ext, c in CODECS.items() if path.endswith(ext)), None)
        self._decompressed = _decompress(self._raw, self.codec) if self.codec else None
        self._chunks = self._clean()
        self._out = b""

    # -- io.RawIOBase -----------------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        """Fills `buffer` whole unless the file ends: a reader that asks for fixed blocks (Arrow's CSV
        reader) then sees the same blocks, and so the same batches, whatever the compression."""
        view, filled = memoryview(buffer).cast("B"), 0
        while filled < len(view):
            if not self._out:
                self._out = next(self._chunks, b"")
                if not self._out:
                    break
            n = min(len(view) - filled, len(self._out))
            view[filled : filled + n] = self._out[:n]
            self._out = self._out[n:]
            filled += n
        return filled

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()

    # -- lines --------------------------------------------------------------------------------------

    def lines(self) -> Iterator[tuple[int, str]]:
        """``(line number, text without the line end)`` of every line kept (replaced ones left out)."""
        number = self._first_line
        pending = ""
        for chunk in self._chunks:
            text = pending + chunk.decode("utf-8")
            parts = text.split("\n")
            pending = parts.pop()
            for part in parts:
                if number not in self.replaced:
                    yield number, part.rstrip("\r")
                number += 1
        if pending and number not in self.replaced:
            yield number, pending.rstrip("\r")

    def rejections(self) -> list[Rejected]:
        """Everything left out, in file order."""
        out = [Rejected(self.path, 1, self.binary, "")] if self.binary else []
        out += [self.replaced[n] for n in sorted(self.replaced)]
        return out + ([self.damage] if self.damage else [])

    # -- cleaning -----------------------------------------------------------------------------------

    def _read_raw(self) -> bytes:
        if self._decompressed is None:
            return self._raw.read(_CHUNK)
        return next(self._decompressed, b"")

    def _clean(self) -> Iterator[bytes]:
        number = self._first_line  # the line number of the first line of `pending`
        pending, skipping, first = b"", False, True
        while True:
            try:
                chunk = self._read_raw()
            except (OSError, EOFError, zlib.error, ValueError) as exc:
                self.damage = Rejected(
                    self.path,
                    number,
                    f"truncated or corrupt {self.codec or 'file'} data ({exc}); lines from {number} on are lost",
                    _preview(pending),
                )
                return
            if first:
                first = False
                self.binary = _why_binary(chunk[:_SNIFF], self.path)
                if self.binary:
                    return
            if not chunk:
                if pending and not skipping:
                    yield self._checked(pending, number)
                return
            if skipping:  # inside a line too long to keep: drop it up to its end
                end = chunk.find(b"\n")
                if end < 0:
                    continue
                chunk, skipping = chunk[end + 1 :], False
                yield b"\n"
                number += 1
            data = pending + chunk
            last = data.rfind(b"\n")
            complete, pending = data[: last + 1], data[last + 1 :]
            if complete:
                yield self._checked(complete, number)
                number += complete.count(b"\n")
            if len(pending) > self.max_line_bytes:
                self.replaced[number] = Rejected(
                    self.path, number, f"line longer than {self.max_line_bytes} bytes", _preview(pending)
                )
                pending, skipping = b"", True

    def _checked(self, data: bytes, number: int) -> bytes:
        """`data` (whole lines from line `number`) with every line that is not clean UTF-8 emptied."""
        if b"\0" not in data:
            try:
                data.decode("utf-8")
                return data
            except UnicodeDecodeError:
                pass
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            reason = None
            if b"\0" in line:
                reason = "NUL byte in line"
            else:
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    reason = f"not UTF-8 (byte {line[exc.start]:#04x} at column {exc.start + 1})"
            if reason:
                self.replaced[number + i] = Rejected(self.path, number + i, reason, _preview(line))
                lines[i] = b""
        return b"\n".join(lines)


class _ReadLinesOf(beam.DoFn):
    REJECTED = "rejected"

    def __init__(self, skip_header_lines: int):
        self._skip = skip_header_lines
        self._lines = beam.metrics.Metrics.counter("input", "lines_read")
        self._bad = beam.metrics.Metrics.counter("input", "lines_rejected")
        self._files = beam.metrics.Metrics.counter("input", "files_read")

    def process(self, path: str):
        with TextReader(path) as reader:
            for number, text in reader.lines():
                if number > self._skip:
                    self._lines.inc()
                    yield Line(path, number, text)
            for rejection in reader.rejections():
                if rejection.line > self._skip or reader.binary or rejection is reader.damage:
                    self._bad.inc()
                    yield beam.pvalue.TaggedOutput(self.REJECTED, rejection)
        self._files.inc()


@beam.ptransform_fn
def ReadLines(pbegin, file_pattern: str, *, skip_header_lines: int = 0, reshuffle: bool = True):
    """``{"lines": every line of the matching files as a `Line`, "rejected": ...}``, read through `TextReader`; what it
    leaves out (a binary file, a line that is not UTF-8 or too long, the rest of a truncated archive) as
    `Rejected`. The files are listed when the pipeline is built."""
    files = match_files(file_pattern)
    read = (
        pbegin
        | "ListFiles" >> beam.Create(files)
        | "ReadFiles"
        >> beam.ParDo(_ReadLinesOf(skip_header_lines)).with_outputs(_ReadLinesOf.REJECTED, main="lines")
    )
    lines = read.lines | "Spread" >> beam.Reshuffle() if reshuffle else read.lines
    return {"lines": lines, "rejected": read.rejected}
