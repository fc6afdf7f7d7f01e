"""Counting in pipelines: totals, several counts as one dict, tallies of rejection reasons, reconciliation.

Every pipeline reports ``read = written + rejected`` in its report.json and checks it before the output is
committed. These transforms give the pieces as single-element PCollections (side inputs of the report):

* `Total`: the sum of a weight per element (1 by default; the rows of a batch, the annotations of a chunk);
* `NamedValues`: ``{name: single-element PCollection}`` -> one dict, and `CountAll` of element counts;
* `ReasonCounts`: how many rejected records per kind of reason; `SumArrays`: elementwise sums;
* `reconcile`: the check itself, raising with the counts when they do not add up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np

__all__ = ["CountAll", "NamedValues", "ReasonCounts", "SumArrays", "Total", "reason_kind", "reconcile"]


@beam.ptransform_fn
def Total(pcoll, weight: Callable[[Any], Any] | None = None):
    """The sum of ``weight(element)`` (1 per element by default), 0 for an empty input; one element."""
    return pcoll | "Weights" >> beam.Map(weight or (lambda _: 1)) | "Sum" >> beam.CombineGlobally(sum)


@beam.ptransform_fn
def NamedValues(pcolls: Mapping[str, Any]):
    """``{name: single-element PCollection}`` -> one PCollection of ``{name: value}``."""
    named = tuple(
        pcoll | f"Name[{name}]" >> beam.Map(lambda v, name=name: (name, v)) for name, pcoll in pcolls.items()
    )
    return named | "Merge" >> beam.Flatten() | "ToDict" >> beam.combiners.ToDict()


@beam.ptransform_fn
def CountAll(pcolls: Mapping[str, Any]):
    """``{name: pcoll}`` -> a single-element PCollection ``{name: count}`` (zero for empty inputs)."""
    counts = {
        name: pcoll | f"Count[{name}]" >> beam.combiners.Count.Globally() for name, pcoll in pcolls.items()
    }
    return counts | "Named" >> NamedValues()


class SumArrays(beam.CombineFn):
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


def reason_kind(reason: str, separators: Sequence[str] = (":", " (")) -> str:
    """The kind of a rejection reason: its text up to the first separator (``"field x1: not a number"``
    -> ``"field x1"``, ``"not UTF-8 (byte 0xe9 at column 7)"`` -> ``"not UTF-8"``)."""
    for sep in separators:
        reason = reason.split(sep)[0]
    return reason


@beam.ptransform_fn
def ReasonCounts(rejected, kind: Callable[[str], str] = reason_kind):
    """Rejected records (with a ``reason``) -> one dict ``{kind of reason: count}``."""
    return (
        rejected
        | "ReasonKind" >> beam.Map(lambda r: kind(r.reason))
        | "CountReasons" >> beam.combiners.Count.PerElement()
        | "ReasonsToDict" >> beam.combiners.ToDict()
    )


def reconcile(counts: Mapping[str, int], total: str, parts: Sequence[str], what: str = "counts") -> None:
    """Raises RuntimeError unless ``counts[total] == sum(counts[p] for p in parts)`` (missing = 0)."""
    have = sum(int(counts.get(p, 0)) for p in parts)
    if int(counts.get(total, 0)) != have:
        shown = {k: int(counts.get(k, 0)) for k in (total, *parts)}
        raise RuntimeError(f"{what} do not reconcile: {total} != {' + '.join(parts)}: {shown}")
