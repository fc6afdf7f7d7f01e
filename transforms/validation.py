"""Validation of columnar batches: each bad row rejected once, with the first problem found.

`first_problems` takes checks in order (a boolean mask over the batch's rows and how to word the
problem of one row) and gives each bad row the reason of the first check it fails: the order of the
checks is the order in which a user would fix a line. `RejectEmptyFields` splits off the rows of a
`CsvBatch` with an empty required field (a blank line reads as all fields empty).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import apache_beam as beam
import numpy as np
import pyarrow.compute as pc

from headrace.transforms.columnar import CsvBatch
from headrace.transforms.io import Rejected

__all__ = ["RejectEmptyFields", "first_problems"]


def first_problems(
    n: int, checks: Iterable[tuple[np.ndarray, Callable[[int], str]]]
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """``(ok mask [n], [(row, reason)] sorted by row)``: each failing row with its first failed check's
    reason. `checks` are ``(bad mask [n], reason(row) -> str)``, in order."""
    ok = np.ones(n, dtype=bool)
    reasons = {}
    for bad, reason in checks:
        for i in np.flatnonzero(bad & ok):
            reasons[int(i)] = reason(int(i))
        ok &= ~bad
    return ok, sorted(reasons.items())


class RejectEmptyFields(beam.DoFn):
    """CsvBatch -> the rows with every one of `columns` non-empty (main output), the others as Rejected
    (``rejected``): "blank line", or "empty task, label"."""

    REJECTED = "rejected"

    def __init__(self, columns: Sequence[str]):
        self._columns = tuple(columns)

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
