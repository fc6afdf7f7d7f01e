"""``headrace run crowd-labels``: aggregate crowdsourced labels with majority vote, Dawid-Skene or GroupAnno.

    headrace run crowd-labels --annotations A.csv [--annotators W.csv] [--tasks T.csv] [--truth Y.csv]
        --method {majority_vote,dawid_skene,groupanno} --output OUT [--iterations N] [--tolerance T]

The models and their EM updates are written down in `headrace.transforms.crowd_em`. The Beam structure:

    ReadCsvBatches(A) -> Validate (-> rejected) -> classes, workers (sorted; side inputs)
                      -> partition rows by hash(task) -> GroupByKey -> BuildChunks (dedup -> rejected)
    chunks -> MajorityStats -> M-step -> [EStep -> M-step] x N -> Posteriors -> join task ids -> outputs

Annotations are grouped by task once, into `partitions` chunks of CSR numpy arrays; every E-step maps over
the chunks with the current parameters as a side input, and every M-step is a keyed combine of per-worker
count matrices (keyed by worker bucket), then per group. The iterations are unrolled in one graph rather
than driven by a loop of pipelines: one job instead of N submissions (seconds each on Flink or Dataflow),
and the chunks stay where the runner put them instead of being written and re-read every iteration. The
price is that the graph cannot stop early: once the log-likelihood has converged, the parameters are
marked converged and the remaining iterations pass them through without touching the data.

Outputs in ``--output``: labels.csv, posteriors.csv, annotators.csv, report.json, rejected.csv,
resolved_config.json; for groupanno groups.csv and groups.png; with ``--tasks``, TFRecord shards
``tasks-{train,eval}-*.tfrecord`` of (task, text, posterior) for ``headrace train crowd-classifier``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterable
from typing import Literal

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from apache_beam.io.filesystems import FileSystems

from headrace.runners import config as config_lib
from headrace.runners.beam_runner import WORK_DIR
from headrace.runners.errors import ConfigError, InputError
from headrace.transforms import crowd_em as em
from headrace.transforms.columnar import (
    CsvBatch,
    ReadCsvBatches,
    check_header,
    partition,
    string_hash,
    unique_strings,
)
from headrace.transforms.io import Rejected, WriteJson, match_files
from headrace.transforms.tfrecord import Feature, FeatureSpec, WriteTFRecordShards

__all__ = ["CrowdConfig", "build_crowd_labels", "crowd_task_spec"]

Method = Literal["majority_vote", "dawid_skene", "groupanno"]
UNKNOWN_GROUP = "unknown"


@dataclasses.dataclass(frozen=True)
class CrowdConfig:
    annotations: str = dataclasses.field(default="", metadata={"help": "CSV task,worker,label"})
    output: str = ""
    method: Method = "dawid_skene"
    annotators: str = dataclasses.field(default="", metadata={"help": "CSV worker,group"})
    tasks: str = dataclasses.field(default="", metadata={"help": "CSV task,text (for the classifier)"})
    truth: str = dataclasses.field(default="", metadata={"help": "CSV task,label: report accuracy"})
    task_priors: str = dataclasses.field(
        default="",
        metadata={"help": "CSV task,<class>...: per-task priors (crowd-classifier predictions.csv)"},
    )
    iterations: int = 50
    tolerance: float = dataclasses.field(
        default=1e-7, metadata={"help": "stop when |dLL| <= tolerance * |LL|"}
    )
    smoothing: float = 0.01
    group_strength: float | None = dataclasses.field(
        default=None, metadata={"help": "GroupAnno's prior strength tau (default: the number of classes)"}
    )
    estimate_group_strength: bool = dataclasses.field(
        default=False, metadata={"help": "estimate tau per group by empirical Bayes"}
    )
    partitions: int = dataclasses.field(
        default=16, metadata={"help": "task partitions: chunks E-steps run over in parallel"}
    )
    worker_buckets: int = 8
    eval_fraction: float = 0.2
    shards: int = 2


@config_lib.register("crowd-labels", command="run crowd-labels")
def crowd_labels() -> CrowdConfig:
    """Label aggregation: Dawid-Skene, 50 iterations, 16 task partitions."""
    return CrowdConfig()


@config_lib.register("crowd-labels-groupanno", command="run crowd-labels")
def crowd_labels_groupanno() -> CrowdConfig:
    """Label aggregation with GroupAnno (needs --annotators)."""
    return CrowdConfig(method="groupanno")


def crowd_task_spec(num_classes: int | None = None) -> FeatureSpec:
    """Records of the classifier shards. The writer does not know K when the graph is built, so the
    posterior is written as a list; readers pass K to parse it as a fixed [K] vector."""
    return FeatureSpec(
        "crowd_task",
        {
            "task": Feature("bytes"),
            "text": Feature("bytes"),
            "posterior": Feature("float32", None if num_classes is None else (num_classes,)),
            "label": Feature("int64", description="argmax of the posterior"),
            "truth": Feature("int64", default=-1, description="true class index, -1 if unknown"),
        },
    )


# -------------------------------------------------------------------------------------------------
# Validation, vocabularies, groups
# -------------------------------------------------------------------------------------------------


class _Validate(beam.DoFn):
    """Splits off rows with an empty field (a blank line reads as all fields empty)."""

    REJECTED = "rejected"

    def __init__(self, columns: tuple[str, ...]):
        self._columns = columns

    def process(self, batch: CsvBatch):
        empty = np.stack(
            [pc.equal(batch.table.column(c), "").to_numpy(zero_copy_only=False) for c in self._columns]
        )  # [columns, rows]
        bad = empty.any(axis=0)
        if not bad.any():
            yield batch
            return
        texts = batch.take(np.flatnonzero(bad)).row_texts()
        for i, text in zip(np.flatnonzero(bad), texts):
            if empty[:, i].all():
                reason = "blank line"
            else:
                reason = "empty " + ", ".join(c for c, e in zip(self._columns, empty[:, i]) if e)
            yield beam.pvalue.TaggedOutput(
                self.REJECTED, Rejected(batch.path, int(batch.lines[i]), reason, text)
            )
        if not bad.all():
            yield batch.take(np.flatnonzero(~bad))


class UnionStrings(beam.CombineFn):
    """Distinct strings of many Arrow arrays, sorted (the class and worker vocabularies)."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, values):
        acc.append(values)
        if len(acc) > 64:
            acc[:] = [unique_strings(pa.chunked_array(acc, type=pa.string()))]
        return acc

    def merge_accumulators(self, accs):
        return [a for acc in accs for a in acc]

    def extract_output(self, acc):
        if not acc:
            return pa.array([], type=pa.string())
        return unique_strings(pa.chunked_array(acc, type=pa.string()))


@dataclasses.dataclass
class Vocab:
    """Classes, workers and groups, with each worker's group index."""

    classes: list[str]
    workers: pa.Array
    groups: list[str]
    worker_groups: np.ndarray  # int32 [W]
    unknown_group_workers: int


def _vocab(classes: pa.Array, workers: pa.Array, group_table: dict | None) -> Vocab:
    names = workers.to_pylist()
    if group_table is None:
        return Vocab(classes.to_pylist(), workers, ["all"], np.zeros(len(names), np.int32), 0)
    groups = sorted(set(group_table.values()))
    unknown = [w for w in names if w not in group_table]
    if unknown:
        groups.append(UNKNOWN_GROUP) if UNKNOWN_GROUP not in groups else None
    index = {g: i for i, g in enumerate(groups)}
    worker_groups = np.array([index[group_table.get(w, UNKNOWN_GROUP)] for w in names], np.int32)
    return Vocab(classes.to_pylist(), workers, groups, worker_groups, len(unknown))


class _Collect(beam.CombineFn):
    """Gathers small CsvBatches (the annotators file) into one list."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, batch):
        acc.append(batch)
        return acc

    def merge_accumulators(self, accs):
        return [b for acc in accs for b in acc]

    def extract_output(self, acc):
        return acc


def _group_table(batches: list[CsvBatch]) -> tuple[dict, list[Rejected]]:
    """worker -> group from the annotators file; a repeated worker keeps its first line."""
    rows = []
    for b in batches:
        rows += [
            (b.path, int(line), w, g)
            for line, w, g in zip(
                b.lines, b.table.column("worker").to_pylist(), b.table.column("group").to_pylist()
            )
        ]
    rows.sort()
    table, first, rejected = {}, {}, []
    for path, line, worker, group in rows:
        if worker in table:
            p0, l0 = first[worker]
            rejected.append(
                Rejected(path, line, f"duplicate worker (first at {p0}:{l0})", f"{worker},{group}")
            )
            continue
        table[worker] = group
        first[worker] = (path, line)
    return table, rejected


# -------------------------------------------------------------------------------------------------
# Grouping by task into chunks
# -------------------------------------------------------------------------------------------------


def _concat(batches: Iterable[CsvBatch]) -> tuple[pa.Table, np.ndarray, list[str], np.ndarray]:
    batches = list(batches)
    paths = sorted({b.path for b in batches})
    index = {p: i for i, p in enumerate(paths)}
    table = pa.concat_tables([b.table for b in batches])
    lines = np.concatenate([b.lines for b in batches])
    path_idx = np.concatenate([np.full(b.num_rows, index[b.path], np.int32) for b in batches])
    return table, lines, paths, path_idx


def pd_to_float(column) -> np.ndarray:
    """A string column as float64 (NaN where it is not a number)."""
    values = column.to_pylist()
    out = np.empty(len(values))
    for i, v in enumerate(values):
        try:
            out[i] = float(v)
        except ValueError:
            out[i] = np.nan
    return out


def _sorted_runs(values: pa.Array) -> np.ndarray:
    """For an array sorted so that equal values are adjacent: True where a new run starts."""
    n = len(values)
    starts = np.ones(n, dtype=bool)
    if n > 1:
        starts[1:] = pc.not_equal(values.slice(1), values.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return starts


class _BuildChunk(beam.DoFn):
    """One task partition -> a Chunk, its task ids, and rejected duplicate (task, worker) pairs."""

    TASKS, REJECTED, USED, PRIORS_USED = "tasks", "rejected", "used", "priors_used"

    def __init__(self, work_dir: str):
        self._work_dir = work_dir

    def process(self, element, vocab: Vocab):
        part, tagged = element
        batches = [b for kind, b in tagged if kind == "a"]
        prior_batches = [b for kind, b in tagged if kind == "p"]
        if not batches:  # only priors fell into this partition: their tasks have no annotations
            for b in prior_batches:
                for line, text in zip(b.lines, b.row_texts()):
                    yield beam.pvalue.TaggedOutput(
                        self.REJECTED, Rejected(b.path, int(line), "task has no annotations", text)
                    )
            return
        table, lines, paths, path_idx = _concat(batches)
        table = table.append_column("_path", pa.array(path_idx)).append_column("_line", pa.array(lines))
        order = pc.sort_indices(
            table,
            sort_keys=[
                ("task", "ascending"),
                ("worker", "ascending"),
                ("_path", "ascending"),
                ("_line", "ascending"),
            ],
        )
        table = table.take(order)
        tasks = table.column("task").combine_chunks()
        workers = table.column("worker").combine_chunks()
        new_task = _sorted_runs(tasks)
        pair_start = new_task | _sorted_runs(workers)
        dup = ~pair_start
        if dup.any():
            first = np.maximum.accumulate(np.where(pair_start, np.arange(len(dup)), 0))
            t_path = table.column("_path").to_numpy()
            t_line = table.column("_line").to_numpy()
            labels_py = table.column("label").to_pylist()
            for i in np.flatnonzero(dup):
                j = first[i]
                text = f"{tasks[i].as_py()},{workers[i].as_py()},{labels_py[i]}"
                reason = f"duplicate task/worker pair (first at {paths[t_path[j]]}:{t_line[j]})"
                yield beam.pvalue.TaggedOutput(
                    self.REJECTED, Rejected(paths[t_path[i]], int(t_line[i]), reason, text)
                )
            keep = pa.array(np.flatnonzero(pair_start))
            table = table.take(keep)
            tasks, workers, new_task = tasks.take(keep), workers.take(keep), new_task[pair_start]
        codes = np.cumsum(new_task) - 1
        worker_idx = pc.index_in(workers, value_set=vocab.workers).to_numpy()
        label_idx = pc.index_in(table.column("label"), value_set=pa.array(vocab.classes, pa.string()))
        label_idx = (
            label_idx.combine_chunks().to_numpy()
            if hasattr(label_idx, "combine_chunks")
            else label_idx.to_numpy()
        )
        task_ids = tasks.filter(pa.array(new_task))
        log_prior = None
        if prior_batches:
            log_prior = np.full((len(task_ids), len(vocab.classes)), np.nan)
            for b in prior_batches:
                yield from self._priors(b, task_ids, vocab.classes, log_prior)
        chunk = em.build_chunk(int(part), codes, worker_idx, label_idx, len(vocab.classes), log_prior)
        yield em.store_chunk(chunk, self._work_dir)
        yield beam.pvalue.TaggedOutput(self.TASKS, (int(part), task_ids))
        yield beam.pvalue.TaggedOutput(self.USED, chunk.num_annotations)

    def _priors(self, batch: CsvBatch, task_ids: pa.Array, classes: list[str], log_prior: np.ndarray):
        """Fills log_prior rows from a --task-priors batch (task, one probability column per class)."""
        missing = [c for c in classes if c not in batch.table.column_names]
        if missing:
            raise InputError(f"--task-priors {batch.path}: no column for class(es) {', '.join(missing)}")
        pos = pc.index_in(batch.table.column("task"), value_set=task_ids).fill_null(-1).to_numpy()
        probs = np.full((batch.num_rows, len(classes)), np.nan)
        for k, c in enumerate(classes):
            probs[:, k] = pd_to_float(batch.table.column(c))
        bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | (probs.sum(axis=1) <= 0)
        texts = batch.row_texts()
        for i in np.flatnonzero((pos < 0) | bad):
            reason = "task has no annotations" if pos[i] < 0 else "probabilities: not non-negative numbers"
            yield beam.pvalue.TaggedOutput(
                self.REJECTED, Rejected(batch.path, int(batch.lines[i]), reason, texts[i])
            )
        ok = (pos >= 0) & ~bad
        p = probs[ok] / probs[ok].sum(axis=1, keepdims=True)
        # A classifier's 0 must not veto the crowd: floor the prior at 1e-4 before taking logs.
        log_prior[pos[ok]] = np.log(np.maximum(p, 1e-4))
        yield beam.pvalue.TaggedOutput(self.PRIORS_USED, int(ok.sum()))


# -------------------------------------------------------------------------------------------------
# The EM iterations
# -------------------------------------------------------------------------------------------------


def _settings(config: CrowdConfig) -> em.EMSettings:
    return em.EMSettings(
        method=config.method,
        smoothing=config.smoothing,
        tolerance=config.tolerance,
        group_strength=config.group_strength,
        estimate_group_strength=config.estimate_group_strength,
        buckets=config.worker_buckets,
    )


def _final_params(_, stats, vocab: Vocab, settings: em.EMSettings) -> em.Params | None:
    if not vocab.classes:
        return None
    collected = em.collect_stats(
        stats, len(vocab.workers), len(vocab.groups), len(vocab.classes), settings.buckets
    )
    return em.derive_params(collected, vocab.worker_groups, settings)


class _Posteriors(beam.DoFn):
    """Final posteriors per chunk, and per-worker sums for the estimated accuracy."""

    ACCURACY = "accuracy"

    def __init__(self, method: str, buckets: int):
        self._method, self._buckets = method, buckets

    def process(self, ref: em.ChunkRef, vocab: Vocab, params: em.Params | None = None):
        chunk = em.load_chunk(ref)
        if self._method == "majority_vote":
            q = em.majority_posteriors(chunk, len(vocab.classes))
        else:
            q, _ = em.e_step(chunk, params)
        yield chunk.id, q
        # Estimated accuracy of worker j: mean over its labels of q_t(label), the posterior that it is right.
        right = q[chunk.task_index, chunk.labels]
        sums = np.bincount(chunk.local, weights=right, minlength=len(chunk.uniq))
        counts = np.bincount(chunk.local, minlength=len(chunk.uniq)).astype(np.float64)
        stats = np.stack([sums, counts], axis=1)[:, None, :]  # [u, 1, 2]
        bucket = chunk.uniq % self._buckets
        for b in np.unique(bucket):
            sel = bucket == b
            yield beam.pvalue.TaggedOutput(
                self.ACCURACY,
                (("w", int(b)), ("w", (chunk.uniq[sel] // self._buckets, stats[sel]))),
            )


# -------------------------------------------------------------------------------------------------
# Outputs
# -------------------------------------------------------------------------------------------------


def _arrow_csv(columns: dict) -> str:
    """Rows as CSV text by Arrow's C++ writer (floats in shortest round-trip form), without a header:
    1M rows in well under a second where csv.writer takes seconds. Values are quoted only if a value
    holds a comma, quote or newline (Arrow's "needed" style would quote every string)."""
    table = pa.table(columns)
    for style in ("none", "needed"):
        sink = io.BytesIO()
        try:
            pcsv.write_csv(table, sink, pcsv.WriteOptions(include_header=False, quoting_style=style))
        except pa.ArrowInvalid:  # a value needs quoting
            continue
        return sink.getvalue().decode("utf-8").rstrip("\n")
    raise AssertionError("unreachable: the 'needed' style always succeeds")


def _csv_rows(rows: Iterable[Iterable]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().rstrip("\n")


def _task_outputs(element, vocab: Vocab, config: CrowdConfig):
    """Per partition: labels.csv / posteriors.csv text, classifier records, truth counts, T rejects."""
    _, groups = element
    if not groups["q"]:
        for batch in groups["text"]:  # tasks with text but no annotation
            for line, text in zip(batch.lines, batch.row_texts()):
                yield beam.pvalue.TaggedOutput(
                    "rejected", Rejected(batch.path, int(line), "task has no annotations", text)
                )
        for batch in groups["truth"]:
            yield beam.pvalue.TaggedOutput("truth_unmatched", batch.num_rows)
        return
    (q,), (tasks,) = groups["q"], groups["tasks"]
    names = tasks.to_pylist()
    labels = np.argmax(q, axis=1)
    class_set = pa.array(vocab.classes, pa.string())
    yield beam.pvalue.TaggedOutput(
        "labels",
        _arrow_csv({"task": tasks, "label": class_set.take(pa.array(labels)), "confidence": q.max(axis=1)}),
    )
    yield beam.pvalue.TaggedOutput(
        "posteriors", _arrow_csv({"task": tasks, **{f"p{k}": q[:, k] for k in range(q.shape[1])}})
    )
    truth_idx = np.full(len(names), -1, dtype=np.int64)  # -1: no truth given for the task
    for batch in groups["truth"]:
        pos = pc.index_in(batch.table.column("task"), value_set=tasks).fill_null(-1).to_numpy()
        cls = pc.index_in(batch.table.column("label"), value_set=class_set).fill_null(-2).to_numpy()
        truth_idx[pos[pos >= 0]] = cls[pos >= 0]  # -2: a true class no annotator ever gave
        yield beam.pvalue.TaggedOutput("truth_unmatched", int((pos < 0).sum()))
    matched = truth_idx != -1
    if matched.any():
        correct = int((labels[matched] == truth_idx[matched]).sum())
        yield beam.pvalue.TaggedOutput(
            "truth_stats", np.array([correct, int(matched.sum())], dtype=np.float64)
        )
    texts = [None] * len(names)
    for batch in groups["text"]:
        pos = pc.index_in(batch.table.column("task"), value_set=tasks).fill_null(-1).to_numpy()
        for i, line, text, raw in zip(
            pos, batch.lines, batch.table.column("text").to_pylist(), batch.row_texts()
        ):
            if i < 0:
                yield beam.pvalue.TaggedOutput(
                    "rejected", Rejected(batch.path, int(line), "task has no annotations", raw)
                )
            elif texts[i] is not None:
                yield beam.pvalue.TaggedOutput(
                    "rejected", Rejected(batch.path, int(line), "duplicate task", raw)
                )
            else:
                texts[i] = text
    is_eval = (string_hash(tasks) % np.uint64(10_000)).astype(np.int64) < config.eval_fraction * 10_000
    for i, (name, text) in enumerate(zip(names, texts)):
        if text is None:
            continue
        record = {
            "task": name,
            "text": text,
            "posterior": q[i].astype(np.float32),
            "label": int(labels[i]),
            "truth": int(truth_idx[i]) if truth_idx[i] >= 0 else -1,
        }
        split = "eval" if is_eval[i] else "train"
        yield beam.pvalue.TaggedOutput(split, record)


def _annotator_rows(element, vocab: Vocab, buckets: int) -> str:
    (_, bucket), (_, stats) = element  # stats [Wb, 1, 2]: sum of q(label), number of labels
    idx = np.arange(len(stats)) * buckets + bucket
    rows = []
    for i, (s, n) in zip(idx, stats[:, 0, :]):
        if n > 0 and i < len(vocab.workers):
            rows.append(
                (
                    vocab.workers[int(i)].as_py(),
                    vocab.groups[vocab.worker_groups[i]],
                    int(n),
                    f"{s / n:.6g}",
                )
            )
    return _csv_rows(rows)


def _group_rows(params: em.Params, vocab: Vocab) -> Iterable[str]:
    if params is None or params.group_matrix is None:
        return []
    rows = []
    for g, name in enumerate(vocab.groups):
        for k, true in enumerate(vocab.classes):
            for l, given in enumerate(vocab.classes):
                rows.append((name, true, given, f"{params.group_matrix[g, k, l]:.6g}"))
    return [_csv_rows(rows)] if rows else []


def _plot_groups(params: em.Params, vocab: Vocab, path: str) -> None:
    if params is None or params.group_matrix is None or not vocab.classes:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(vocab.groups)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 0.8, 3.4), squeeze=False)
    for ax, name, mat, tau in zip(axes[0], vocab.groups, params.group_matrix, params.group_strength):
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{name} (tau={tau:.3g})", fontsize=9)
        ax.set_xticks(range(len(vocab.classes)), vocab.classes, rotation=45, fontsize=7)
        ax.set_yticks(range(len(vocab.classes)), vocab.classes, fontsize=7)
        ax.set_xlabel("given label")
        if ax is axes[0][0]:
            ax.set_ylabel("true class")
        for (k, l), v in np.ndenumerate(mat):
            ax.text(
                l,
                k,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="w" if v < 0.6 else "k",
            )
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle("GroupAnno group confusion matrices P(given | true)")
    with FileSystems.create(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def _report(
    counts: dict, params, vocab: Vocab, config: CrowdConfig, reasons: dict, truth: np.ndarray | None
) -> dict:
    read, used, rejected = counts.get("read", 0), counts.get("used", 0), counts.get("rejected", 0)
    if read != used + rejected:
        raise RuntimeError(
            f"annotation counts do not reconcile: read {read} != used {used} + rejected {rejected}"
        )
    report = {
        "method": config.method,
        "classes": vocab.classes,
        "read": read,
        "used": used,
        "rejected": rejected,
        "rejected_reasons": dict(sorted(reasons.items())),
        "tasks": counts.get("tasks", 0),
        "workers": len(vocab.workers),
        "unknown_group_workers": vocab.unknown_group_workers,
    }
    if config.annotators:
        report["annotators_file"] = {
            "read": counts.get("w_read", 0),
            "used": counts.get("w_read", 0) - counts.get("w_rejected", 0),
            "rejected": counts.get("w_rejected", 0),
        }
    if config.tasks:
        report["tasks_file"] = {
            "read": counts.get("t_read", 0),
            "written": counts.get("t_train", 0) + counts.get("t_eval", 0),
            "train": counts.get("t_train", 0),
            "eval": counts.get("t_eval", 0),
            "rejected": counts.get("t_rejected", 0),
        }
        t = report["tasks_file"]
        if t["read"] != t["written"] + t["rejected"]:
            raise RuntimeError(f"task file counts do not reconcile: {t}")
    if config.task_priors:
        report["task_priors_file"] = {
            "read": counts.get("p_read", 0),
            "used": counts.get("p_used", 0),
            "rejected": counts.get("p_read", 0) - counts.get("p_used", 0),
        }
    if config.method != "majority_vote" and params is not None:
        report["iterations"] = params.iteration
        report["converged"] = params.converged
        report["log_likelihood"] = [round(v, 6) for v in params.log_likelihood]
    else:
        report["iterations"] = 0
    if params is not None and params.group_strength is not None:
        report["groups"] = {
            name: {
                "strength": float(params.group_strength[g]),
                "workers": int((vocab.worker_groups == g).sum()),
            }
            for g, name in enumerate(vocab.groups)
        }
    if truth is not None and truth[1] > 0:
        report["truth"] = {
            "tasks": int(truth[1]),
            "accuracy": float(truth[0] / truth[1]),
            "unmatched": counts.get("truth_unmatched", 0),
        }
    return report


def _count(pcoll, label: str, weight=None):
    """Sum of `weight(element)` (1 per element by default) as a single-element PCollection."""
    mapped = pcoll | f"{label}Weights" >> beam.Map(weight or (lambda _: 1))
    return mapped | f"{label}Sum" >> beam.CombineGlobally(sum)


def _rejected_rows(rejected: Rejected) -> str:
    return _csv_rows([(rejected.source, rejected.line, rejected.reason, rejected.text)])


# -------------------------------------------------------------------------------------------------
# The pipeline
# -------------------------------------------------------------------------------------------------


def validate_config(config: CrowdConfig) -> None:
    if not config.annotations:
        raise ConfigError("--annotations is required")
    if config.method == "groupanno" and not config.annotators:
        raise ConfigError(
            "--method groupanno needs --annotators W.csv (header worker,group): the group of each annotator"
        )
    if config.iterations < 1 and config.method != "majority_vote":
        raise ConfigError("--iterations must be >= 1")
    if config.partitions < 1 or config.worker_buckets < 1:
        raise ConfigError("--partitions and --worker-buckets must be >= 1")
    if config.smoothing <= 0:
        raise ConfigError("--smoothing must be > 0 (it keeps every probability above zero)")


def build_crowd_labels(pipeline: beam.Pipeline, config: CrowdConfig) -> dict:
    """Adds the label-aggregation pipeline to `pipeline`; returns its main PCollections."""
    validate_config(config)
    out = config.output.rstrip("/")
    P = config.partitions

    read = pipeline | "ReadAnnotations" >> ReadCsvBatches(
        config.annotations, ["task", "worker", "label"], flag="--annotations"
    )
    valid = read.batches | "Validate" >> beam.ParDo(_Validate(("task", "worker", "label"))).with_outputs(
        _Validate.REJECTED, main="ok"
    )
    batches = valid.ok
    classes = (
        batches
        | "Labels" >> beam.Map(lambda b: unique_strings(b.table.column("label")))
        | "Classes" >> beam.CombineGlobally(UnionStrings())
    )
    workers = (
        batches
        | "WorkerNames" >> beam.Map(lambda b: unique_strings(b.table.column("worker")))
        | "Workers" >> beam.CombineGlobally(UnionStrings())
    )

    rejected_parts = [read.rejected, valid[_Validate.REJECTED]]
    counts = {
        "read": _count(read.batches, "ReadRows", lambda b: b.num_rows),
        "read_malformed": _count(read.rejected, "ReadMalformed"),
    }
    if config.annotators:
        wread = pipeline | "ReadAnnotators" >> ReadCsvBatches(
            config.annotators, ["worker", "group"], flag="--annotators"
        )
        wvalid = wread.batches | "ValidateAnnotators" >> beam.ParDo(
            _Validate(("worker", "group"))
        ).with_outputs(_Validate.REJECTED, main="ok")
        wtable = (
            wvalid.ok
            | "CollectAnnotators" >> beam.CombineGlobally(_Collect())
            | "GroupTable" >> beam.Map(_group_table)
        )
        group_table = wtable | "Table" >> beam.Map(lambda t: t[0])
        wdups = wtable | "DuplicateWorkers" >> beam.FlatMap(lambda t: t[1])
        rejected_parts += [wread.rejected, wvalid[_Validate.REJECTED], wdups]
        counts["w_read"] = _count(wread.batches, "WRows", lambda b: b.num_rows)
        counts["w_malformed"] = _count(wread.rejected, "WMalformed")
        counts["w_empty"] = _count(wvalid[_Validate.REJECTED], "WEmpty")
        counts["w_dups"] = _count(wdups, "WDups")
        group_si = beam.pvalue.AsSingleton(group_table)
    else:
        group_si = None
    vocab = classes | "Vocab" >> beam.Map(
        lambda c, w, g=None: _vocab(c, w, g),
        beam.pvalue.AsSingleton(workers),
        *([group_si] if group_si else []),
    )
    vocab_si = beam.pvalue.AsSingleton(vocab)

    # Group by task once: rows hash-partitioned by task, one chunk per partition.
    partitioned = batches | "PartitionByTask" >> beam.FlatMap(
        lambda b, n: ((p, ("a", sub)) for p, sub in partition(b, "task", n)), P
    )
    if config.task_priors:
        header = check_header(
            match_files(config.task_priors, flag="--task-priors")[0], ["task"], flag="--task-priors"
        )
        pread = pipeline | "ReadPriors" >> ReadCsvBatches(config.task_priors, header, flag="--task-priors")
        rejected_parts.append(pread.rejected)
        counts["p_read"] = _count(pread.batches, "PRows", lambda b: b.num_rows)
        counts["p_malformed"] = _count(pread.rejected, "PMalformed")
        priors = pread.batches | "PartitionPriors" >> beam.FlatMap(
            lambda b, n: ((p, ("p", sub)) for p, sub in partition(b, "task", n)), P
        )
        partitioned = (partitioned, priors) | "WithPriors" >> beam.Flatten()
    chunked = (
        partitioned
        | "GroupByTask" >> beam.GroupByKey()
        | "BuildChunks"
        >> beam.ParDo(_BuildChunk(f"{out}/{WORK_DIR}/chunks"), vocab_si).with_outputs(
            _BuildChunk.TASKS, _BuildChunk.REJECTED, _BuildChunk.USED, _BuildChunk.PRIORS_USED, main="chunks"
        )
    )
    chunks = chunked.chunks
    rejected_parts.append(chunked[_BuildChunk.REJECTED])
    counts["used"] = _count(chunked[_BuildChunk.USED], "Used", lambda n: n)
    counts["tasks"] = _count(chunks, "Tasks", lambda c: c.num_tasks)
    if config.task_priors:
        counts["p_used"] = _count(chunked[_BuildChunk.PRIORS_USED], "PUsed", lambda n: n)

    # EM: each iteration is one ParDo over the chunks and one keyed combine of its statistics.
    params = None
    if config.method != "majority_vote":
        settings = _settings(config)
        # The chunk references plus one sentinel, from one producer: Flink's job server (Beam 2.62)
        # fails on a Flatten feeding ParDos whose side inputs derive from its own output ("A
        # PCollectionNode should have exactly one producing PTransformNode"). The Reshuffle spreads
        # the references over workers again.
        carried = (
            chunks
            | "ChunkList" >> beam.combiners.ToList()
            | "WithSentinel" >> beam.FlatMap(lambda refs: [*refs, em.SENTINEL])
            | "SpreadChunks" >> beam.Reshuffle()
        )
        stats = (
            carried
            | "MajorityStats" >> beam.ParDo(em.EMStep(settings, majority=True), vocab_si)
            | "CombineInit" >> beam.CombinePerKey(em.StatsFn())
        )
        for t in range(1, config.iterations + 1):
            stats = (
                carried
                | f"EStep{t}" >> beam.ParDo(em.EMStep(settings), vocab_si, beam.pvalue.AsList(stats))
                | f"MStep{t}" >> beam.CombinePerKey(em.StatsFn())
            )
        params = (
            pipeline
            | "Once" >> beam.Create([None])
            | "FinalParams" >> beam.Map(_final_params, beam.pvalue.AsList(stats), vocab_si, settings)
        )
    params_si = beam.pvalue.AsSingleton(params) if params is not None else None
    final = chunks | "Posteriors" >> beam.ParDo(
        _Posteriors(config.method, config.worker_buckets),
        vocab_si,
        *([params_si] if params_si else []),
    ).with_outputs(_Posteriors.ACCURACY, main="q")

    # Join posteriors with task ids (and texts, truth) per partition.
    join = {"q": final.q, "tasks": chunked[_BuildChunk.TASKS]}
    for name, path, columns, flag in (
        ("text", config.tasks, ["task", "text"], "--tasks"),
        ("truth", config.truth, ["task", "label"], "--truth"),
    ):
        if path:
            r = pipeline | f"Read{name.title()}" >> ReadCsvBatches(path, columns, flag=flag)
            v = r.batches | f"Validate{name.title()}" >> beam.ParDo(_Validate(tuple(columns))).with_outputs(
                _Validate.REJECTED, main="ok"
            )
            join[name] = v.ok | f"Partition{name.title()}" >> beam.FlatMap(partition, "task", P)
            if name == "text":
                rejected_parts += [r.rejected, v[_Validate.REJECTED]]
                counts["t_read"] = _count(r.batches, "TRows", lambda b: b.num_rows)
                counts["t_malformed"] = _count(r.rejected, "TMalformed")
                counts["t_empty"] = _count(v[_Validate.REJECTED], "TEmpty")
        else:
            join[name] = pipeline | f"No{name.title()}" >> beam.Create([])
    outputs = (
        join
        | "JoinByPartition" >> beam.CoGroupByKey()
        | "TaskOutputs"
        >> beam.ParDo(_task_outputs, vocab_si, config).with_outputs(
            "labels", "posteriors", "train", "eval", "rejected", "truth_stats", "truth_unmatched"
        )
    )
    rejected_parts.append(outputs.rejected)

    outputs.labels | "WriteLabels" >> beam.io.WriteToText(
        f"{out}/labels.csv", shard_name_template="", header="task,label,confidence"
    )
    posterior_header = vocab | "PosteriorHeader" >> beam.Map(lambda v: _csv_rows([["task", *v.classes]]))
    outputs.posteriors | "WritePosteriors" >> _WriteWithHeader(f"{out}/posteriors.csv", posterior_header)
    accuracy = (
        final[_Posteriors.ACCURACY]
        | "AccuracySums" >> beam.CombinePerKey(em.StatsFn())
        | "AnnotatorRows" >> beam.Map(_annotator_rows, vocab_si, config.worker_buckets)
        | "NonEmpty" >> beam.Filter(bool)
    )
    accuracy | "WriteAnnotators" >> beam.io.WriteToText(
        f"{out}/annotators.csv", shard_name_template="", header="worker,group,labels,accuracy"
    )
    if config.method == "groupanno":
        (
            params
            | "GroupRows" >> beam.FlatMap(_group_rows, vocab_si)
            | "WriteGroups"
            >> beam.io.WriteToText(
                f"{out}/groups.csv", shard_name_template="", header="group,true,given,probability"
            )
        )
        params | "PlotGroups" >> beam.Map(_plot_groups, vocab_si, f"{out}/groups.png")
    if config.tasks:
        for split in ("train", "eval"):
            outputs[split] | f"Write{split.title()}Tasks" >> WriteTFRecordShards(
                crowd_task_spec(), f"{out}/tasks-{split}", config.shards
            )
            counts[f"t_{split}"] = _count(outputs[split], f"T{split.title()}")
        counts["t_rejected_join"] = _count(outputs.rejected, "TJoinRejected")

    rejected = _fan_out(tuple(rejected_parts), "AllRejected")
    (
        rejected
        | "RejectedRows" >> beam.Map(_rejected_rows)
        | "WriteRejected"
        >> beam.io.WriteToText(f"{out}/rejected.csv", shard_name_template="", header="file,line,reason,row")
    )
    annotation_rejects = rejected | "AnnotationRejects" >> beam.Filter(
        lambda r, files: r.source in files, _annotation_files(config)
    )
    counts["rejected"] = _count(annotation_rejects, "Rejected")
    reasons = (
        rejected
        | "ReasonKinds" >> beam.Map(lambda r: r.reason.split(" (")[0].split(":")[0])
        | "CountReasons" >> beam.combiners.Count.PerElement()
        | "ReasonsDict" >> beam.combiners.ToDict()
    )
    truth_stats = outputs.truth_stats | "TruthStats" >> beam.CombineGlobally(_SumArrays())
    counts["truth_unmatched"] = _count(outputs.truth_unmatched, "TruthUnmatched", lambda n: n)
    count_dict = (
        tuple(c | f"Name[{k}]" >> beam.Map(lambda n, k=k: (k, n)) for k, c in counts.items())
        | "CountsFlatten" >> beam.Flatten()
        | "CountsDict" >> beam.combiners.ToDict()
        | "FoldCounts" >> beam.Map(_fold_counts)
    )
    report = count_dict | "Report" >> beam.Map(
        _report,
        params_si if params_si is not None else None,
        vocab_si,
        config,
        beam.pvalue.AsSingleton(reasons),
        beam.pvalue.AsSingleton(truth_stats),
    )
    report | "WriteReport" >> WriteJson(f"{out}/report.json")
    return {"report": report, "rejected": rejected, "params": params, "chunks": chunks}


def _fan_out(pcolls: tuple, label: str):
    """A Flatten whose result feeds several consumers, materialised once by a Reshuffle."""
    return pcolls | f"{label}Flatten" >> beam.Flatten() | f"{label}" >> beam.Reshuffle()


def _annotation_files(config: CrowdConfig) -> set[str]:
    from headrace.transforms.io import match_files

    return set(match_files(config.annotations, flag="--annotations"))


def _fold_counts(c: dict) -> dict:
    """Derived counts: rejected task-file rows, rejected annotator-file rows."""
    c = dict(c)
    c["w_rejected"] = c.get("w_malformed", 0) + c.get("w_empty", 0) + c.get("w_dups", 0)
    c["w_read"] = c.get("w_read", 0) + c.get("w_malformed", 0)
    c["t_rejected"] = c.get("t_malformed", 0) + c.get("t_empty", 0) + c.get("t_rejected_join", 0)
    c["t_read"] = c.get("t_read", 0) + c.get("t_malformed", 0)
    c["read"] = c.get("read", 0) + c.get("read_malformed", 0)
    c["p_read"] = c.get("p_read", 0) + c.get("p_malformed", 0)
    return c


class _SumArrays(beam.CombineFn):
    """Elementwise sum of equally shaped arrays (None when empty)."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, value):
        return np.asarray(value, dtype=np.float64) + (0 if acc is None else acc)

    def merge_accumulators(self, accs):
        accs = [a for a in accs if a is not None]
        return sum(accs[1:], accs[0]) if accs else None

    def extract_output(self, acc):
        return acc


class _WriteWithHeader(beam.PTransform):
    """WriteToText whose header is computed in the pipeline (posterior columns are the classes)."""

    def __init__(self, path: str, header):
        super().__init__()
        self.path, self.header = path, header

    def expand(self, pcoll):
        body = pcoll | "Body" >> beam.combiners.ToList()
        return (
            self.header
            | "Join" >> beam.Map(lambda h, rows: "\n".join([h, *rows]), beam.pvalue.AsSingleton(body))
            | "Write" >> beam.io.WriteToText(self.path, shard_name_template="")
        )
