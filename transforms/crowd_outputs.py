"""The crowd-labels pipeline's outputs: labels and posteriors CSV, classifier records, annotators, groups.

Per task partition (`task_outputs`): the aggregated labels and posteriors as CSV text (written by Arrow's
C++ CSV writer: a million rows in well under a second), the classifier records of tasks that have a text
(split train/eval by a hash of the task), accuracy against the truth file, and every task-file or
truth-file row that matches no annotated task, rejected with its reason. `annotator_rows` writes each
worker's estimated accuracy, `group_rows` and `plot_groups` GroupAnno's group confusion matrices.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from apache_beam.io.filesystems import FileSystems

from headrace.transforms import crowd_em as em
from headrace.transforms.columnar import string_hash
from headrace.transforms.crowd_chunks import Vocab
from headrace.transforms.io import Rejected

__all__ = ["annotator_rows", "csv_rows", "group_rows", "plot_groups", "task_outputs"]


def arrow_csv(columns: dict) -> str:
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


def csv_rows(rows: Iterable[Iterable]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().rstrip("\n")


def task_outputs(element, vocab: Vocab, eval_fraction: float):
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
        arrow_csv({"task": tasks, "label": class_set.take(pa.array(labels)), "confidence": q.max(axis=1)}),
    )
    yield beam.pvalue.TaggedOutput(
        "posteriors", arrow_csv({"task": tasks, **{f"p{k}": q[:, k] for k in range(q.shape[1])}})
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
    is_eval = (string_hash(tasks) % np.uint64(10_000)).astype(np.int64) < eval_fraction * 10_000
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


def annotator_rows(element, vocab: Vocab, buckets: int) -> str:
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
    return csv_rows(rows)


def group_rows(params: em.Params, vocab: Vocab) -> Iterable[str]:
    if params is None or params.group_matrix is None:
        return []
    rows = []
    for g, name in enumerate(vocab.groups):
        for k, true in enumerate(vocab.classes):
            for l, given in enumerate(vocab.classes):
                rows.append((name, true, given, f"{params.group_matrix[g, k, l]:.6g}"))
    return [csv_rows(rows)] if rows else []


def plot_groups(params: em.Params, vocab: Vocab, path: str) -> None:
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
