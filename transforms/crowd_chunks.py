"""Crowd annotations grouped by task into EM chunks: vocabularies, annotator groups, deduplication, priors.

The vocabulary (`Vocab`) is the sorted classes and workers, and each worker's group from the annotators
file (`group_table`: a repeated worker keeps its first line; workers missing from it form the group
``unknown``). `BuildChunks` turns one task partition's annotation batches into a `crowd_em.Chunk` (CSR
arrays over annotations), rejecting every repeated (task, worker) pair but the first in file order, and
fills the chunk's per-task log priors from ``--task-priors`` rows that fall into the same partition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from headrace.core.errors import InputError
from headrace.transforms import crowd_em as em
from headrace.transforms.columnar import CsvBatch
from headrace.transforms.io import Rejected

__all__ = ["UNKNOWN_GROUP", "BuildChunks", "Vocab", "group_table", "make_vocab"]

UNKNOWN_GROUP = "unknown"


@dataclasses.dataclass
class Vocab:
    """Classes, workers and groups, with each worker's group index."""

    classes: list[str]
    workers: pa.Array
    groups: list[str]
    worker_groups: np.ndarray  # int32 [W]
    unknown_group_workers: int


def make_vocab(classes: pa.Array, workers: pa.Array, group_table: dict | None) -> Vocab:
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


def group_table(batches: list[CsvBatch]) -> tuple[dict, list[Rejected]]:
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


class BuildChunks(beam.DoFn):
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
