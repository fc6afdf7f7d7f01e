"""``headrace run ctr-ingest``: Criteo-format TSV or Parquet CTR logs -> sharded TFRecords, feature statistics.

    headrace run ctr-ingest --input GLOB --format {criteo,parquet} --output OUT
        [--eval-fraction 0.1] [--min-count N] [--shards N] [--runner R]

Structure (every step works on Arrow batches of up to 64k rows, never one Python object per line):

    ReadCsvBatches / ReadParquetBatches -> Process: validate (-> rejected), split and shard by a hash of
    the line, encode tf.Examples, value counts of the train split
        -> WriteSerializedShards(train / eval)
        -> value counts combined per (field, hash shard) -> stats.json, vocab/<field>.tsv
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

from headrace.pipelines.ctr_data import CAT_FIELDS, INT_FIELDS
from headrace.runners import config as config_lib
from headrace.runners.errors import ConfigError
from headrace.transforms.columnar import (
    CsvBatch,
    ReadCsvBatches,
    ReadParquetBatches,
    string_hash,
)
from headrace.transforms.io import Rejected, WriteJson, WriteJsonLines
from headrace.transforms.tfrecord import (
    Feature,
    FeatureSpec,
    RecordBatch,
    WriteSerializedShards,
    encode_fixed,
    tfrecord_dataset,
)

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
    input: str = dataclasses.field(default="", metadata={"help": "file glob (.gz read as gzip)"})
    output: str = ""
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
    ds = tfrecord_dataset(f"{out.rstrip('/')}/{split}-*.tfrecord", CTR_SPEC, batch_size, **kwargs)
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
    n = table.num_rows
    problems = []  # (mask, field, what): the first matching entry names a bad row
    blank = np.ones(n, dtype=bool)
    for name in COLUMNS:
        blank &= _bool(pc.equal(table.column(name), ""))
    problems.append((blank, "", "blank line"))
    label = table.column("label")
    problems.append((~_bool(pc.is_in(label, value_set=pa.array(["0", "1"]))), "label", "expected 0 or 1"))
    for name in INT_FIELDS:
        col = table.column(name)
        bad = ~_bool(pc.equal(col, "")) & ~_bool(pc.match_substring_regex(col, _INTEGER))
        problems.append((bad, name, "not an integer"))
    ok = np.ones(n, dtype=bool)
    reasons = {}
    for bad, name, what in problems:
        for i in np.flatnonzero(bad & ok):
            reasons[i] = what if not name else f"{name}: {what}, got {table.column(name)[int(i)].as_py()!r}"
        ok &= ~bad
    return ok, sorted(reasons.items())


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

    REJECTED, TRAIN, EVAL, VALUES, FIELD_STATS, COUNTS = (
        "rejected",
        "train",
        "eval",
        "values",
        "field_stats",
        "counts",
    )

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
        yield from self._statistics(train)

    def _statistics(self, train: pa.Table):
        c = self._config
        partial = {}
        for name in (*INT_FIELDS, *CAT_FIELDS):
            col = train.column(name)
            present = col.filter(pc.not_equal(col, ""))
            stats = {"count": train.num_rows, "missing": train.num_rows - len(present)}
            if name in INT_FIELDS and len(present):
                x = np.log1p(np.maximum(pc.cast(present, pa.int64()).to_numpy(zero_copy_only=False), 0))
                stats.update(log1p_sum=float(x.sum()), log1p_min=float(x.min()), log1p_max=float(x.max()))
            partial[name] = stats
            if len(present):
                counts = pc.value_counts(present)
                values, freq = counts.field("values"), counts.field("counts").to_numpy()
                shard = (string_hash(values) % np.uint64(c.stats_shards)).astype(np.int64)
                for s in np.unique(shard):
                    sel = np.flatnonzero(shard == s)
                    yield beam.pvalue.TaggedOutput(
                        self.VALUES, ((name, int(s)), (values.take(pa.array(sel)), freq[sel]))
                    )
        yield beam.pvalue.TaggedOutput(self.FIELD_STATS, partial)


# -------------------------------------------------------------------------------------------------
# Statistics
# -------------------------------------------------------------------------------------------------


class ValueCounts(beam.CombineFn):
    """Exact value frequencies of one (field, shard): Arrow arrays merged by a C++ group-by."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, value):
        acc.append(value)
        return self._compact(acc) if len(acc) >= 32 else acc

    def merge_accumulators(self, accs):
        merged = [v for acc in accs for v in acc]
        return self._compact(merged) if len(merged) >= 32 else merged

    @staticmethod
    def _compact(acc):
        if len(acc) <= 1:
            return acc
        table = pa.table(
            {
                "value": pa.concat_arrays([v for v, _ in acc]),
                "count": pa.array(np.concatenate([c for _, c in acc]).astype(np.int64)),
            }
        )
        summed = table.group_by("value").aggregate([("count", "sum")])
        return [(summed.column("value").combine_chunks(), summed.column("count_sum").to_numpy())]

    def extract_output(self, acc):
        acc = self._compact(acc)
        if not acc:
            return pa.array([], pa.string()), np.zeros(0, np.int64)
        return acc[0]


def _order(values: pa.Array, counts: np.ndarray) -> np.ndarray:
    """Indices by descending count, ties by value (deterministic on every runner)."""
    table = pa.table({"v": values, "c": pa.array(counts)})
    return pc.sort_indices(table, sort_keys=[("c", "descending"), ("v", "ascending")]).to_numpy()


def _shard_summary(element, min_count: int, top_k: int):
    (field, _), (values, counts) = element
    order = _order(values, counts)
    keep = order[counts[order] >= min_count]
    return field, {
        "distinct": len(values),
        "kept": len(keep),
        "top": [(values[int(i)].as_py(), int(counts[i])) for i in order[:top_k]],
        "vocab": (values.take(pa.array(keep)), counts[keep]),
    }


class MergeFieldStats(beam.CombineFn):
    """Sums per-batch field statistics (counts, missing, log1p sums; min and max)."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, partial):
        for name, s in partial.items():
            a = acc.setdefault(name, {"count": 0, "missing": 0})
            a["count"] += s["count"]
            a["missing"] += s["missing"]
            if "log1p_sum" in s:
                a["log1p_sum"] = a.get("log1p_sum", 0.0) + s["log1p_sum"]
                a["log1p_min"] = min(a.get("log1p_min", np.inf), s["log1p_min"])
                a["log1p_max"] = max(a.get("log1p_max", -np.inf), s["log1p_max"])
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for acc in accs:
            out = self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        return acc


def _field_summary(element, top_k: int):
    field, summaries = element
    summaries = list(summaries)
    tops = [t for s in summaries for t in s["top"]]
    tops.sort(key=lambda t: (-t[1], t[0]))
    vocab_values = (
        pa.concat_arrays([s["vocab"][0] for s in summaries]) if summaries else pa.array([], pa.string())
    )
    vocab_counts = np.concatenate([s["vocab"][1] for s in summaries]) if summaries else np.zeros(0, np.int64)
    order = _order(vocab_values, vocab_counts)
    vocab = "\n".join(f"{vocab_values[int(i)].as_py()}\t{int(vocab_counts[i])}" for i in order)
    return field, {
        "distinct": sum(s["distinct"] for s in summaries),
        "kept": sum(s["kept"] for s in summaries),
        "top": tops[:top_k],
        "vocab": vocab,
    }


def _stats_json(field_stats: dict, summaries: dict, config: CtrIngestConfig) -> dict:
    fields = {}
    for name in (*INT_FIELDS, *CAT_FIELDS):
        s = field_stats.get(name, {"count": 0, "missing": 0})
        summary = summaries.get(name, {"distinct": 0, "kept": 0, "top": []})
        entry = {
            "count": s["count"],
            "missing": s["missing"],
            "distinct": summary["distinct"],
            "kept": summary["kept"],
            "top": [[v, c] for v, c in summary["top"]],
        }
        if name in INT_FIELDS:
            present = s["count"] - s["missing"]
            entry["log1p_min"] = s.get("log1p_min") if present else None
            entry["log1p_max"] = s.get("log1p_max") if present else None
            entry["log1p_mean"] = s["log1p_sum"] / present if present else None
        fields[name] = entry
    return {"split": "train", "min_count": config.min_count, "fields": fields}


def _write_vocab(element, out: str):
    from apache_beam.io.filesystems import FileSystems

    field, summary = element
    if field in CAT_FIELDS:
        with FileSystems.create(f"{out}/vocab/{field}.tsv") as f:
            f.write((summary["vocab"] + "\n" if summary["vocab"] else "").encode())
    return field


# -------------------------------------------------------------------------------------------------
# The pipeline
# -------------------------------------------------------------------------------------------------


def _report(counts: dict) -> dict:
    split = counts.get("split") if counts.get("split") is not None else np.zeros(2, np.int64)
    report = {
        "read": int(counts.get("rows", 0) + counts.get("malformed", 0)),
        "train": int(split[0]),
        "eval": int(split[1]),
        "rejected": int(counts.get("rejected", 0)),
    }
    if report["read"] != report["train"] + report["eval"] + report["rejected"]:
        raise RuntimeError(f"counts do not reconcile: {report}")
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

    rejected = (malformed, processed[_Process.REJECTED]) | "AllRejected" >> beam.Flatten()
    rejected | "WriteRejected" >> WriteJsonLines(f"{out}/rejected/rejected")

    summaries = (
        processed[_Process.VALUES]
        | "ValueCounts" >> beam.CombinePerKey(ValueCounts())
        | "ShardSummary" >> beam.Map(_shard_summary, config.min_count, config.top_k)
        | "ByField" >> beam.GroupByKey()
        | "FieldSummary" >> beam.Map(_field_summary, config.top_k)
    )
    summaries | "WriteVocab" >> beam.Map(_write_vocab, out)
    field_stats = processed[_Process.FIELD_STATS] | "FieldStats" >> beam.CombineGlobally(MergeFieldStats())
    stats = field_stats | "Stats" >> beam.Map(_stats_json, beam.pvalue.AsDict(summaries), config)
    stats | "WriteStats" >> WriteJson(f"{out}/stats.json")

    def total(pcoll, label, fn):
        return pcoll | f"{label}Sizes" >> beam.Map(fn) | f"{label}Sum" >> beam.CombineGlobally(sum)

    counts = {
        "rows": total(batches, "Rows", lambda b: b.num_rows),
        "malformed": total(malformed, "Malformed", lambda _: 1),
        "split": processed[_Process.COUNTS]
        | "SplitSum" >> beam.CombineGlobally(lambda xs: sum(xs, np.zeros(2, np.int64))),
        "rejected": total(rejected, "Rejected", lambda _: 1),
        "reasons": (
            rejected
            | "ReasonKind" >> beam.Map(lambda r: r.reason.split(",")[0])
            | "CountReasons" >> beam.combiners.Count.PerElement()
            | "ReasonDict" >> beam.combiners.ToDict()
        ),
    }
    report = (
        tuple(v | f"Name[{k}]" >> beam.Map(lambda x, k=k: (k, x)) for k, v in counts.items())
        | "CountsFlatten" >> beam.Flatten()
        | "CountsDict" >> beam.combiners.ToDict()
        | "Report" >> beam.Map(_report)
    )
    report | "WriteReport" >> WriteJson(f"{out}/report.json")
    return {"report": report, "stats": stats, "rejected": rejected}
