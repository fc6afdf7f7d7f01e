"""Counting in pipelines: totals, several counts as one dict, tallies of rejection reasons, reconciliation.

Every pipeline reports ``read = written + rejected`` in its report.json and checks it before the output is
committed. These transforms give the pieces as single-element PCollections (side inputs of the report):

* `Total`: the sum of a weight per element (1 by default; the rows of a batch, the annotations of a chunk);
* `NamedValues`: ``{name: single-element PCollection}`` -> one dict, and `CountAll` of element counts;
* `ReasonCounts`: how many rejected records per kind of reason; `SumArrays`: elementwise sums;
* `Fixed`: an exact, order-free sum of float arrays (what makes a combine give the same bits on every runner);
* `reconcile`: the check itself, raising with the counts when they do not add up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np

__all__ = [
    "CountAll",
    "Fixed",
    "NamedValues",
    "ReasonCounts",
    "SumArrays",
    "Total",
    "reason_kind",
    "reconcile",
]


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


_FRACTION_BITS = 62
_ONE = np.int64(1) << np.int64(_FRACTION_BITS)


class Fixed:
    """A float64 array held as fixed point: an int64 whole part and an int64 fraction in units of 2^-62.

    A runner combines in whatever order its bundles and workers give, and float addition is not
    associative: the same EM on the in-process runner and on a Flink cluster differed in the last bits.
    Integer addition is, so a sum of `Fixed` values is the same whatever the order and grouping, and
    ``to_float`` then rounds it once. Each term is rounded to 2^-62 (about 2e-19) on the way in; whole parts
    must stay within int64 (sums of counts and log-likelihoods do).
    """

    __slots__ = ("fraction", "whole")

    def __init__(self, whole: np.ndarray, fraction: np.ndarray):
        self.whole, self.fraction = whole, fraction

    @classmethod
    def of(cls, values) -> Fixed:
        x = np.asarray(values, dtype=np.float64)
        if not np.isfinite(x).all():
            raise ValueError("Fixed: a sum of non-finite values")
        whole = np.floor(x)
        fraction = np.rint((x - whole) * float(_ONE)).astype(np.int64)  # x - floor(x) is exact
        return cls(whole.astype(np.int64), fraction)._carried()

    def _carried(self) -> Fixed:
        carry = self.fraction >> _FRACTION_BITS
        return Fixed(self.whole + carry, self.fraction - (carry << _FRACTION_BITS))

    def __add__(self, other: Fixed) -> Fixed:
        return Fixed(self.whole + other.whole, self.fraction + other.fraction)._carried()

    def padded(self, length: int) -> Fixed:
        """Dimension 0 extended with zeros to `length` rows."""
        extra = length - len(self.whole)
        if extra <= 0:
            return self
        pad = [(0, extra)] + [(0, 0)] * (self.whole.ndim - 1)
        return Fixed(np.pad(self.whole, pad), np.pad(self.fraction, pad))

    def to_float(self) -> np.ndarray:
        return self.whole.astype(np.float64) + self.fraction.astype(np.float64) / float(_ONE)


class SumArrays(beam.CombineFn):
    """Elementwise sum of equally shaped arrays (None when empty), exact and independent of the order."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, value):
        value = Fixed.of(value)
        return value if acc is None else acc + value

    def merge_accumulators(self, accs):
        accs = [a for a in accs if a is not None]
        return sum(accs[1:], accs[0]) if accs else None

    def extract_output(self, acc):
        return None if acc is None else acc.to_float()


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
