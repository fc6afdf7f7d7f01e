"""Reading raw text inputs and writing the small files every pipeline leaves beside its outputs.

* `ReadLines`: lines of text files with their file and line number, so a rejected record can name where it
  came from (gzip and other compressions by extension). Files are read whole by one worker each and the
  lines reshuffled, which parallelises parsing; inputs meant for scale come as many files (as Criteo's
  daily logs do).
* `WriteJson` / `WriteJsonLines`: a single JSON file or line-delimited JSON, written by Beam's text sink;
  `WriteTextWithHeader`: one text file whose header is computed in the pipeline; `WriteSortedText`: one
  text file of lines in a key order (both write the same bytes on every runner).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from headrace.core.errors import InputError

__all__ = [
    "Line",
    "Rejected",
    "WriteJson",
    "WriteJsonLines",
    "WriteSortedText",
    "WriteTextWithHeader",
    "match_files",
]


class Line(NamedTuple):
    """A line of an input file: its path, 1-based line number and text (without the newline)."""

    path: str
    number: int
    text: str


class Rejected(NamedTuple):
    """An input record not used, with where it came from and why."""

    source: str
    line: int
    reason: str
    text: str

    def to_json(self) -> str:
        return json.dumps(self._asdict(), ensure_ascii=False)


def match_files(file_pattern: str, *, flag: str = "--input") -> list[str]:
    """Files matching a pattern (checked when the pipeline is built, so the error names the flag)."""
    try:
        results = FileSystems.match([file_pattern])
    except Exception as exc:  # Beam wraps "no match" and permission errors alike
        raise InputError(f"{flag} {file_pattern}: {exc}") from None
    files = sorted(m.path for r in results for m in r.metadata_list)
    if not files:
        raise InputError(f"{flag} {file_pattern}: no files match")
    return files


@beam.ptransform_fn
def WriteJson(pcoll, path: str):
    """Writes the single dict in `pcoll` to `path` as indented JSON."""
    return (
        pcoll
        | "Dumps" >> beam.Map(lambda d: json.dumps(d, indent=2, sort_keys=True, default=_jsonable))
        | "Write" >> beam.io.WriteToText(path, shard_name_template="", num_shards=1)
    )


@beam.ptransform_fn
def WriteJsonLines(pcoll, file_path_prefix: str, *, num_shards: int = 1):
    """Writes dicts (or objects with ``to_json``) one per line to ``PREFIX-SSSSS-of-NNNNN.jsonl``."""
    return (
        pcoll
        | "Dumps"
        >> beam.Map(lambda r: r.to_json() if hasattr(r, "to_json") else json.dumps(r, default=_jsonable))
        | "Write" >> beam.io.WriteToText(file_path_prefix, file_name_suffix=".jsonl", num_shards=num_shards)
    )


class WriteTextWithHeader(beam.PTransform):
    """The lines of `pcoll`, sorted (the same bytes on every runner), as one text file after a `header`
    line computed in the pipeline (a single-element PCollection: e.g. CSV columns named by the classes
    found). The lines are gathered in one worker's memory."""

    def __init__(self, path: str, header):
        super().__init__()
        self.path, self.header = path, header

    def expand(self, pcoll):
        body = pcoll | "Body" >> beam.combiners.ToList()
        return (
            self.header
            | "Join" >> beam.Map(lambda h, rows: "\n".join([h, *sorted(rows)]), beam.pvalue.AsSingleton(body))
            | "Write" >> beam.io.WriteToText(self.path, shard_name_template="")
        )


def _sorted_text(pairs: list, header: str | None) -> str:
    lines = [line for _, line in sorted(pairs, key=lambda p: p[0])]
    return "\n".join(([header] if header is not None else []) + lines)


@beam.ptransform_fn
def WriteSortedText(pcoll, path: str, header: str | None = None):
    """``(sort key, line)`` pairs -> one text file of the lines in key order after an optional header: the
    same bytes on every runner (a runner's element order is its own). The lines are gathered in one worker's
    memory: for outputs of a line per task or annotator, not per record of a dataset."""
    return (
        pcoll
        | "Gather" >> beam.combiners.ToList()
        | "Join" >> beam.Map(_sorted_text, header)
        | "Write" >> beam.io.WriteToText(path, shard_name_template="")
    )


def _jsonable(value: Any) -> Any:
    try:  # numpy scalars and arrays
        return value.tolist()
    except AttributeError:
        return str(value)
