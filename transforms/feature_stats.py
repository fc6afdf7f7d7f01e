"""Feature statistics and vocabularies of columnar batches, computed exactly and combined across workers.

Per batch (`batch_statistics`): for every field, the row count and missing values, for numeric fields
sums and extremes of log1p(x), and the value frequencies, split by a hash of the value into
`stats_shards` keys so that no single worker holds a field's whole vocabulary. Combined
(`FieldStatistics`): exact frequencies per (field, shard) merged by Arrow's C++ group-by, the top values
and the values seen at least `min_count` times per field, written as ``VOCAB_DIR/<field>.tsv`` (value,
count; by descending count, ties by value: the same on every runner) for the categorical fields, and one
statistics dict (what ``stats.json`` holds).
"""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from headrace.transforms.columnar import string_hash

__all__ = ["FIELD_STATS", "VALUES", "FieldStatistics", "MergeFieldStats", "ValueCounts", "batch_statistics"]

VALUES, FIELD_STATS = "values", "field_stats"


def batch_statistics(table: pa.Table, numeric: Sequence[str], categorical: Sequence[str], stats_shards: int):
    """The statistics of one batch as tagged outputs: ``VALUES`` ``((field, shard), (values, counts))``
    and one ``FIELD_STATS`` dict of per-field partial sums."""
    partial = {}
    for name in (*numeric, *categorical):
        col = table.column(name)
        present = col.filter(pc.not_equal(col, ""))
        stats = {"count": table.num_rows, "missing": table.num_rows - len(present)}
        if name in numeric and len(present):
            x = np.log1p(np.maximum(pc.cast(present, pa.int64()).to_numpy(zero_copy_only=False), 0))
            stats.update(log1p_sum=float(x.sum()), log1p_min=float(x.min()), log1p_max=float(x.max()))
        partial[name] = stats
        if len(present):
            counts = pc.value_counts(present)
            values, freq = counts.field("values"), counts.field("counts").to_numpy()
            shard = (string_hash(values) % np.uint64(stats_shards)).astype(np.int64)
            for s in np.unique(shard):
                sel = np.flatnonzero(shard == s)
                yield beam.pvalue.TaggedOutput(
                    VALUES, ((name, int(s)), (values.take(pa.array(sel)), freq[sel]))
                )
    yield beam.pvalue.TaggedOutput(FIELD_STATS, partial)


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


def _stats_json(
    field_stats: dict, summaries: dict, numeric: Sequence[str], names: Sequence[str], min_count: int
) -> dict:
    fields = {}
    for name in names:
        s = field_stats.get(name, {"count": 0, "missing": 0})
        summary = summaries.get(name, {"distinct": 0, "kept": 0, "top": []})
        entry = {
            "count": s["count"],
            "missing": s["missing"],
            "distinct": summary["distinct"],
            "kept": summary["kept"],
            "top": [[v, c] for v, c in summary["top"]],
        }
        if name in numeric:
            present = s["count"] - s["missing"]
            entry["log1p_min"] = s.get("log1p_min") if present else None
            entry["log1p_max"] = s.get("log1p_max") if present else None
            entry["log1p_mean"] = s["log1p_sum"] / present if present else None
        fields[name] = entry
    return {"split": "train", "min_count": min_count, "fields": fields}


def _write_vocab(element, directory: str, categorical: Sequence[str]):
    field, summary = element
    if field in categorical:
        with FileSystems.create(f"{directory}/{field}.tsv") as f:
            f.write((summary["vocab"] + "\n" if summary["vocab"] else "").encode())
    return field


@beam.ptransform_fn
def FieldStatistics(
    parts,
    *,
    numeric: Sequence[str],
    categorical: Sequence[str],
    min_count: int,
    top_k: int,
    vocab_dir: str,
):
    """``{"values": ..., "field_stats": ...}`` (the tagged outputs of `batch_statistics`) -> one
    statistics dict; writes the categorical fields' vocabularies under `vocab_dir`."""
    summaries = (
        parts[VALUES]
        | "ValueCounts" >> beam.CombinePerKey(ValueCounts())
        | "ShardSummary" >> beam.Map(_shard_summary, min_count, top_k)
        | "ByField" >> beam.GroupByKey()
        | "FieldSummary" >> beam.Map(_field_summary, top_k)
    )
    summaries | "WriteVocab" >> beam.Map(_write_vocab, vocab_dir, list(categorical))
    field_stats = parts[FIELD_STATS] | "FieldStats" >> beam.CombineGlobally(MergeFieldStats())
    return field_stats | "Stats" >> beam.Map(
        _stats_json, beam.pvalue.AsDict(summaries), list(numeric), [*numeric, *categorical], min_count
    )
