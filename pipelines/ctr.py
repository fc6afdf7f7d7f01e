"""``headrace run ctr-ingest``: Criteo-format TSV or Parquet CTR logs -> sharded TFRecords, feature statistics.

    headrace run ctr-ingest --input GLOB --format {criteo,parquet} --output OUT
        [--eval-fraction 0.1] [--min-count N] [--shards N] [--runner R]

Structure (every step works on Arrow batches of up to 64k rows, never one Python object per line):

    ReadCsvBatches / ReadParquetBatches -> Process: validate (-> rejected), split and shard by a hash of
    the line, encode tf.Examples, value counts of the train split
        -> WriteSerializedShards(train / eval), spec.json
        -> FieldStatistics: value counts combined per (field, hash shard) -> stats.json, vocab/<field>.tsv
        -> counts -> report.json (read = train + eval + rejected)

Lines: ``label`` (0 or 1), ``I1..I13`` (integers, may be empty = missing), ``C1..C26`` (categorical
values, typically 8-digit hex, may be empty), tab-separated, no header; gzip by extension. A line with the
wrong field count, a non-integer in an integer field, or a label other than 0/1 is rejected with the
first offending field. Parquet: the same columns (integers, floats holding integers, or strings; nulls
are missing); rows are numbered from 1 in place of lines.

Examples (`CTR_SPEC`) keep the raw values: ``label``, ``I`` [13] (0 where missing), ``I_missing`` [13]
(1 where missing), ``C`` [26] (bytes, b"" where missing). Hashing the categorical values is the trainer's
job, so that training and serving (which receives raw Criteo fields) hash the same way.

The split is a hash of the line: ``eval`` if ``h mod 10^4 < eval_fraction * 10^4``; the shard is
``(h div 10^4) mod shards``. Re-runs, other runners and the Parquet copy of the same data give the same
split and the same shard contents. Statistics and vocabularies are computed on the train split only
(values seen only in evaluation data must not enter a vocabulary).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError
from headrace.models.criteo import CAT_FIELDS, INT_FIELDS
from headrace.transforms import feature_stats
from headrace.transforms.columnar import CsvBatch, ReadCsvBatches, ReadParquetBatches, string_hash
from headrace.transforms.counting import NamedValues, ReasonCounts, Total, reconcile
from headrace.transforms.io import Rejected, WriteJson, WriteJsonLines
from headrace.transforms.tfrecord import (
    Feature,
    FeatureSpec,
    RecordBatch,
    WriteSerializedShards,
    WriteSpec,
    encode_fixed,
    output_dataset,
)
from headrace.transforms.validation import first_problems

__all__ = [
    "COLUMNS",
    "CTR_SPEC",
    "CtrIngestConfig",
    "build_ctr_ingest",
    "dataset",
    "split_and_shard",
    "to_named",
]

COLUMNS = ["label", *INT_FIELDS, *CAT_FIELDS]
SPLIT_MOD = 10_000
_INTEGER = r"^-?[0-9]{1,18}$"

CTR_SPEC = FeatureSpec(
    "ctr",
    {
        "label": Feature("int64", description="1 = click"),
        "I": Feature("int64", (len(INT_FIELDS),), description="I1..I13, 0 where missing"),
        "I_missing": Feature("int64", (len(INT_FIELDS),), description="1 where I_k is missing"),
        "C": Feature("bytes", (len(CAT_FIELDS),), description="C1..C26 raw values, b'' where missing"),
    },
)


@dataclasses.dataclass(frozen=True)
class CtrIngestConfig:
    input: str = dataclasses.field(
        default="", metadata={"help": "file glob (.gz read as gzip)", "required": True}
    )
    output: str = dataclasses.field(
        default="", metadata={"help": "output folder (or gs:// prefix)", "required": True}
    )
    format: Literal["criteo", "parquet"] = "criteo"
    eval_fraction: float = 0.1
    min_count: int = dataclasses.field(
        default=1, metadata={"help": "values seen fewer times in train are left out of vocab/ and 'kept'"}
    )
    shards: int = 8
    top_k: int = 10
    stats_shards: int = 8
    batch_rows: int = 65_536


@config_lib.register("ctr-ingest", command="run ctr-ingest")
def ctr_ingest() -> CtrIngestConfig:
    """Criteo TSV -> 8 train shards (10% eval), statistics of every field."""
    return CtrIngestConfig()


@config_lib.register("ctr-ingest-filtered", command="run ctr-ingest")
def ctr_ingest_filtered() -> CtrIngestConfig:
    """As ctr-ingest, keeping only values seen at least 10 times in the vocabularies."""
    return CtrIngestConfig(min_count=10)


def dataset(out: str, split: str, batch_size: int, *, named: bool = False, **kwargs):
    """Batched feature dicts of OUT/{split}-*.tfrecord, parsed by CTR_SPEC (the writer's spec).

    Yields ``{"label": [B], "I": [B, 13], "I_missing": [B, 13], "C": [B, 26]}``; with ``named=True``
    one entry per raw field instead (``I1..I13`` int64, ``I1_missing``.., ``C1..C26`` string).
    Keyword arguments go to `headrace.transforms.tfrecord.tfrecord_dataset` (shuffle, seed, repeat...).
    """
    ds = output_dataset(out, split, batch_size, CTR_SPEC, **kwargs)
    if named:
        import tensorflow as tf

        ds = ds.map(to_named, num_parallel_calls=tf.data.AUTOTUNE)
    return ds


def to_named(batch: dict) -> dict:
    out = {"label": batch["label"]}
    for k, name in enumerate(INT_FIELDS):
        out[name] = batch["I"][:, k]
        out[f"{name}_missing"] = batch["I_missing"][:, k]
    for k, name in enumerate(CAT_FIELDS):
        out[name] = batch["C"][:, k]
    return out


def split_and_shard(table: pa.Table, eval_fraction: float, shards: int) -> tuple[np.ndarray, np.ndarray]:
    """(is_eval, shard) per row from the hash of the line (the fields joined by tabs)."""
    line = pc.binary_join_element_wise(*[table.column(c) for c in COLUMNS], "\t")
    h = string_hash(line)
    is_eval = (h % np.uint64(SPLIT_MOD)).astype(np.int64) < round(eval_fraction * SPLIT_MOD)
    shard = ((h // np.uint64(SPLIT_MOD)) % np.uint64(shards)).astype(np.int64)
    return is_eval, shard


# -------------------------------------------------------------------------------------------------
# Per batch: validate, split, encode, count
# -------------------------------------------------------------------------------------------------


def _bool(array) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=bool)


def _validate(batch: CsvBatch) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """(ok mask, [(row, reason)]) with the first offending field of each bad row, in column order."""
    table = batch.table
    blank = np.ones(table.num_rows, dtype=bool)
    for name in COLUMNS:
        blank &= _bool(pc.equal(table.column(name), ""))

    def field(name: str, what: str):
        return lambda i: f"{name}: {what}, got {table.column(name)[i].as_py()!r}"

    label = table.column("label")
    checks = [
        (blank, lambda i: "blank line"),
        (~_bool(pc.is_in(label, value_set=pa.array(["0", "1"]))), field("label", "expected 0 or 1")),
    ]
    for name in INT_FIELDS:
        col = table.column(name)
        bad = ~_bool(pc.equal(col, "")) & ~_bool(pc.match_substring_regex(col, _INTEGER))
        checks.append((bad, field(name, "not an integer")))
    return first_problems(table.num_rows, checks)


def _encode(table: pa.Table) -> RecordBatch:
    n = table.num_rows
    ints = np.empty((n, len(INT_FIELDS)), dtype=np.int64)
    missing = np.empty((n, len(INT_FIELDS)), dtype=np.int64)
    for k, name in enumerate(INT_FIELDS):
        col = table.column(name)
        absent = _bool(pc.equal(col, ""))
        missing[:, k] = absent
        ints[:, k] = pc.cast(pc.if_else(pa.array(absent), "0", col), pa.int64()).to_numpy(
            zero_copy_only=False
        )
    return encode_fixed(
        CTR_SPEC,
        {
            "label": pc.cast(table.column("label"), pa.int64()).to_numpy(zero_copy_only=False),
            "I": ints,
            "I_missing": missing,
            "C": [table.column(name) for name in CAT_FIELDS],
        },
        n,
    )


class _Process(beam.DoFn):
    """A batch -> rejected rows, (split, shard) record batches, and train-split statistics."""

    REJECTED, TRAIN, EVAL, COUNTS = "rejected", "train", "eval", "counts"
    VALUES, FIELD_STATS = feature_stats.VALUES, feature_stats.FIELD_STATS

    def __init__(self, config: CtrIngestConfig, eval_shards: int):
        self._config, self._eval_shards = config, eval_shards
        self._lines = beam.metrics.Metrics.counter("ctr_ingest", "lines_valid")
        self._bad = beam.metrics.Metrics.counter("ctr_ingest", "lines_rejected")

    def process(self, batch: CsvBatch):
        c = self._config
        ok, reasons = _validate(batch)
        if reasons:
            texts = batch.take([i for i, _ in reasons]).row_texts("\t")
            for (i, reason), text in zip(reasons, texts):
                yield beam.pvalue.TaggedOutput(
                    self.REJECTED, Rejected(batch.path, int(batch.lines[i]), reason, text)
                )
            self._bad.inc(len(reasons))
        good = batch.take(np.flatnonzero(ok)) if reasons else batch
        n = good.num_rows
        if n == 0:
            yield beam.pvalue.TaggedOutput(self.COUNTS, np.array([0, 0]))
            return
        self._lines.inc(n)
        is_eval, shard_hash = split_and_shard(good.table, c.eval_fraction, 1 << 30)
        records = _encode(good.table)
        for split, mask, shards in (("train", ~is_eval, c.shards), ("eval", is_eval, self._eval_shards)):
            rows = np.flatnonzero(mask)
            shard = shard_hash[rows] % shards
            for s in np.unique(shard):
                sel = rows[shard == s]
                yield beam.pvalue.TaggedOutput(
                    self.TRAIN if split == "train" else self.EVAL, (int(s), records.take(sel))
                )
        yield beam.pvalue.TaggedOutput(self.COUNTS, np.array([int((~is_eval).sum()), int(is_eval.sum())]))
        train = good.table.filter(pa.array(~is_eval))
        yield from feature_stats.batch_statistics(train, INT_FIELDS, CAT_FIELDS, c.stats_shards)


# -------------------------------------------------------------------------------------------------
# The pipeline
# -------------------------------------------------------------------------------------------------


def _report(counts: dict) -> dict:
    split = counts.get("split")
    split = np.zeros(2, np.int64) if split is None or np.ndim(split) == 0 else split
    report = {
        "read": int(counts.get("rows", 0) + counts.get("malformed", 0)),
        "train": int(split[0]),
        "eval": int(split[1]),
        "rejected": int(counts.get("rejected", 0)),
    }
    reconcile(report, "read", ("train", "eval", "rejected"))
    return {**report, "rejected_reasons": counts.get("reasons", {})}


def build_ctr_ingest(pipeline: beam.Pipeline, config: CtrIngestConfig) -> dict:
    if not config.input:
        raise ConfigError("--input is required")
    if not 0 <= config.eval_fraction < 1:
        raise ConfigError(f"--eval-fraction {config.eval_fraction}: expected a fraction in [0, 1)")
    if config.shards < 1 or config.min_count < 1:
        raise ConfigError("--shards and --min-count must be >= 1")
    out = config.output.rstrip("/")
    eval_shards = max(1, round(config.shards * config.eval_fraction)) if config.eval_fraction else 1

    if config.format == "criteo":
        read = pipeline | "Read" >> ReadCsvBatches(
            config.input,
            COLUMNS,
            flag="--input",
            delimiter="\t",
            header=False,
            column_names=COLUMNS,
            batch_rows=config.batch_rows,
            quoting=False,
        )
        batches, malformed = read.batches, read.rejected
    else:
        batches = pipeline | "Read" >> ReadParquetBatches(
            config.input, COLUMNS, flag="--input", batch_rows=config.batch_rows
        )
        malformed = pipeline | "NoMalformed" >> beam.Create([])

    processed = batches | "Process" >> beam.ParDo(_Process(config, eval_shards)).with_outputs(
        _Process.REJECTED,
        _Process.TRAIN,
        _Process.EVAL,
        _Process.VALUES,
        _Process.FIELD_STATS,
        _Process.COUNTS,
    )
    processed[_Process.TRAIN] | "WriteTrain" >> WriteSerializedShards(f"{out}/train", config.shards)
    processed[_Process.EVAL] | "WriteEval" >> WriteSerializedShards(f"{out}/eval", eval_shards)
    pipeline | "WriteSpec" >> WriteSpec(out, {"train": CTR_SPEC, "eval": CTR_SPEC})

    rejected = (malformed, processed[_Process.REJECTED]) | "AllRejected" >> beam.Flatten()
    rejected | "WriteRejected" >> WriteJsonLines(f"{out}/rejected/rejected")

    parts = {tag: processed[tag] for tag in (_Process.VALUES, _Process.FIELD_STATS)}
    stats = parts | "Statistics" >> feature_stats.FieldStatistics(
        numeric=INT_FIELDS,
        categorical=CAT_FIELDS,
        min_count=config.min_count,
        top_k=config.top_k,
        vocab_dir=f"{out}/vocab",
    )
    stats | "WriteStats" >> WriteJson(f"{out}/stats.json")

    counts = {
        "rows": batches | "Rows" >> Total(lambda b: b.num_rows),
        "malformed": malformed | "Malformed" >> Total(),
        "split": processed[_Process.COUNTS] | "Split" >> Total(lambda counts: counts),
        "rejected": rejected | "Rejected" >> Total(),
        "reasons": rejected | "Reasons" >> ReasonCounts(lambda r: r.split(",")[0].split(" (")[0]),
    }
    report = counts | "Counts" >> NamedValues() | "Report" >> beam.Map(_report)
    report | "WriteReport" >> WriteJson(f"{out}/report.json")
    return {"report": report, "stats": stats, "rejected": rejected}
