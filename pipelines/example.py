"""The example pipeline: CSV records -> validated, split, sharded TFRecords, with rejects and a report.

It is the smallest pipeline that keeps every contract of DESIGN.md, and what ``headrace demo`` runs first:

    ReadLines -> Parse (-> rejected) -> Split by hash of id -> WriteTFRecordShards(train / eval)
                                                          -> report.json (read = train + eval + rejected)

Input: CSV files with header ``id,x0,x1,x2,x3,tokens,label`` (tokens: space-separated integers, possibly
none; label 0 or 1). Without ``--input`` the pipeline generates `num_records` lines from a planted
logistic model (so the trainer has something to learn) with one malformed line every `malformed_every`.

Outputs in ``--output``: ``train-SSSSS-of-NNNNN.tfrecord``, ``eval-...``, ``spec.json`` (`EXAMPLE_SPEC`,
what `dataset` reads them with), ``rejected-...jsonl`` (each unused line with file, line number and
reason), ``report.json`` and ``resolved_config.json``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterator

import apache_beam as beam
import numpy as np

from headrace.core import config as config_lib
from headrace.transforms.counting import CountAll, ReasonCounts, reconcile
from headrace.transforms.io import Line, Rejected, WriteJson, WriteJsonLines
from headrace.transforms.textfiles import ReadLines
from headrace.transforms.tfrecord import Feature, FeatureSpec, WriteSpec, WriteTFRecordShards, output_dataset

__all__ = [
    "EXAMPLE_SPEC",
    "ExampleConfig",
    "build_example",
    "dataset",
    "generate_lines",
    "parse_line",
    "planted_probability",
]

HEADER = "id,x0,x1,x2,x3,tokens,label"
NUM_DENSE = 4
VOCAB_SIZE = 100

EXAMPLE_SPEC = FeatureSpec(
    "example",
    {
        "id": Feature("bytes", description="record id, as in the input"),
        "dense": Feature("float32", (NUM_DENSE,), description="x0..x3"),
        "tokens": Feature("int64", None, description="variable-length token ids"),
        "label": Feature("int64", description="0 or 1"),
    },
)


def dataset(out: str, split: str, batch_size: int, **kwargs):
    """Batched records of ``OUT/{split}-*.tfrecord`` (``train`` or ``eval``), parsed by `EXAMPLE_SPEC`:
    ``{"id" [B], "dense" [B, 4], "tokens" ragged [B, None], "label" [B]}``. Keyword arguments go to
    `headrace.transforms.tfrecord.tfrecord_dataset` (shuffle, seed, repeat...)."""
    return output_dataset(out, split, batch_size, EXAMPLE_SPEC, **kwargs)


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
    output: str = dataclasses.field(
        default="", metadata={"help": "output folder (or gs:// prefix)", "required": True}
    )
    input: str = ""  # CSV glob; empty: generate `num_records` lines
    num_records: int = 20_000
    malformed_every: int = 500
    seed: int = 0
    shards: int = 4
    eval_fraction: float = 0.1


@config_lib.register("example", command="run example")
def example() -> ExampleConfig:
    """Example pipeline on 20k generated records (the demo's first step)."""
    return ExampleConfig()


@config_lib.register("example_large", command="run example")
def example_large() -> ExampleConfig:
    """Example pipeline on 1M generated records, 16 shards (for benchmarks)."""
    return ExampleConfig(num_records=1_000_000, shards=16)


# -------------------------------------------------------------------------------------------------
# Generated input: a planted logistic model
# -------------------------------------------------------------------------------------------------

PLANTED_WEIGHTS = np.array([1.5, -1.0, 0.5, 0.0])


def _token_effect(vocab: int = VOCAB_SIZE) -> np.ndarray:
    return np.sin(np.arange(vocab) * 0.7) * 1.2  # fixed per-token contribution to the logit


def planted_probability(dense: np.ndarray, tokens: list[int] | np.ndarray) -> float:
    """p(label = 1) under the planted model: the Bayes-optimal score a trained model can approach."""
    tokens = np.asarray(tokens, dtype=np.int64)
    effect = _token_effect()[tokens].mean() if len(tokens) else 0.0
    return 1 / (1 + math.exp(-(float(np.asarray(dense) @ PLANTED_WEIGHTS) + effect - 0.3)))


def generate_lines(seed: int, start: int, count: int, malformed_every: int) -> Iterator[Line]:
    """Lines ``start .. start+count-1`` of the generated input (deterministic in seed and index)."""
    rng = np.random.default_rng([seed, start])
    for i in range(start, start + count):
        x = np.round(rng.normal(size=NUM_DENSE), 5)
        tokens = rng.integers(0, VOCAB_SIZE, size=rng.integers(0, 6))
        label = int(rng.random() < planted_probability(x, tokens))
        fields = [f"r{i:08d}", *(f"{v:.5f}" for v in x), " ".join(map(str, tokens)), str(label)]
        if malformed_every and i % malformed_every == malformed_every - 1:
            kind = (i // malformed_every) % 4
            if kind == 0:
                fields = fields[:-1]  # a field missing
            elif kind == 1:
                fields[2] = "n/a"  # not a number
            elif kind == 2:
                fields[-1] = "2"  # label out of range
            else:
                fields[5] = "7 x 9"  # bad token
        yield Line("<generated>", i + 2, ",".join(fields))  # +2: 1-based, after a header line


# -------------------------------------------------------------------------------------------------
# Parsing
# -------------------------------------------------------------------------------------------------


def parse_line(line: Line) -> dict | Rejected:
    """A record for EXAMPLE_SPEC, or a Rejected naming the field that is wrong."""

    def reject(reason: str) -> Rejected:
        return Rejected(line.path, line.number, reason, line.text)

    fields = line.text.split(",")
    if len(fields) != 7:
        return reject(f"field count: expected 7 ({HEADER}), got {len(fields)}")
    if not fields[0]:
        return reject("field id: empty")
    dense = []
    for k, text in enumerate(fields[1:5]):
        try:
            value = float(text)
        except ValueError:
            return reject(f"field x{k}: not a number: {text!r}")
        if not math.isfinite(value):
            return reject(f"field x{k}: not finite: {text!r}")
        dense.append(value)
    try:
        tokens = [int(t) for t in fields[5].split()]
    except ValueError:
        return reject(f"field tokens: not space-separated integers: {fields[5]!r}")
    if any(t < 0 or t >= VOCAB_SIZE for t in tokens):
        return reject(f"field tokens: ids must be in [0, {VOCAB_SIZE})")
    if fields[6] not in ("0", "1"):
        return reject(f"field label: expected 0 or 1, got {fields[6]!r}")
    return {"id": fields[0], "dense": dense, "tokens": tokens, "label": int(fields[6])}


class _Parse(beam.DoFn):
    REJECTED = "rejected"

    def __init__(self):
        self._ok = beam.metrics.Metrics.counter("example", "parsed")
        self._bad = beam.metrics.Metrics.counter("example", "rejected")

    def process(self, line: Line):
        parsed = parse_line(line)
        if isinstance(parsed, Rejected):
            self._bad.inc()
            yield beam.pvalue.TaggedOutput(self.REJECTED, parsed)
        else:
            self._ok.inc()
            yield parsed


def is_eval(record_id: str, eval_fraction: float) -> bool:
    """Deterministic split: a stable hash of the id (same split on every run and runner)."""
    return zlib.crc32(record_id.encode()) % 10_000 < eval_fraction * 10_000


def _report(counts: dict, reasons: dict) -> dict:
    counts = {k: counts.get(k, 0) for k in ("read", "train", "eval", "rejected")}
    reconcile(counts, "read", ("train", "eval", "rejected"))
    return {**counts, "rejected_reasons": dict(sorted(reasons.items()))}


@beam.ptransform_fn
@beam.typehints.with_output_types(Line)
def GenerateLines(pbegin, num_records: int, seed: int, malformed_every: int, chunk: int = 5_000):
    """`generate_lines` in chunks of `chunk` lines, spread over workers."""
    starts = range(0, num_records, chunk)
    return (
        pbegin
        | "Chunks" >> beam.Create([(s, min(chunk, num_records - s)) for s in starts])
        | "Generate"
        >> beam.FlatMap(
            lambda sc, seed, every: generate_lines(seed, sc[0], sc[1], every), seed, malformed_every
        )
        | "Spread" >> beam.Reshuffle()
    )


def build_example(pipeline: beam.Pipeline, config: ExampleConfig) -> dict:
    """Adds the example pipeline to `pipeline`; returns its named PCollections."""
    out = config.output.rstrip("/")
    if config.input:
        read = pipeline | "Read" >> ReadLines(config.input, skip_header_lines=1)
        lines, unreadable = read["lines"], [read["rejected"]]  # what ReadLines left out is read too
    else:
        lines = pipeline | "Generate" >> GenerateLines(
            config.num_records, config.seed, config.malformed_every
        )
        unreadable = []  # (no empty Create: Flink's runner drops it and fails the job)
    parsed = lines | "Parse" >> beam.ParDo(_Parse()).with_outputs(_Parse.REJECTED, main="ok")
    records = parsed.ok
    rejected = (*unreadable, parsed[_Parse.REJECTED]) | "AllRejected" >> beam.Flatten()
    read_records = (lines, *unreadable) | "AllRead" >> beam.Flatten()
    split = records | "Split" >> beam.Partition(
        lambda r, n, frac: int(is_eval(r["id"], frac)), 2, config.eval_fraction
    )
    train, evals = split[0], split[1]
    eval_shards = max(1, math.ceil(config.shards * config.eval_fraction))
    train | "WriteTrain" >> WriteTFRecordShards(EXAMPLE_SPEC, f"{out}/train", config.shards)
    evals | "WriteEval" >> WriteTFRecordShards(EXAMPLE_SPEC, f"{out}/eval", eval_shards)
    pipeline | "WriteSpec" >> WriteSpec(out, {"train": EXAMPLE_SPEC, "eval": EXAMPLE_SPEC})
    rejected | "WriteRejected" >> WriteJsonLines(f"{out}/rejected")

    counts = {
        "read": read_records,
        "train": train,
        "eval": evals,
        "rejected": rejected,
    } | "Counts" >> CountAll()
    reasons = rejected | "Reasons" >> ReasonCounts()
    report = counts | "Report" >> beam.Map(_report, beam.pvalue.AsSingleton(reasons))
    report | "WriteReport" >> WriteJson(f"{out}/report.json")
    return {"train": train, "eval": evals, "rejected": rejected, "report": report}
