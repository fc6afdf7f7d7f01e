"""Packing token streams into fixed-length rows, as seqio packs them (the text and omni pipelines).

Each document's tokens fill rows of `seq_len` in order; a document goes into the current row if it fits,
else starts a new one, so no document is split across rows unless it is longer than a row (then it fills
whole rows, its remainder continuing in the next). Every row carries ``segment_ids`` (1, 2, ... per
document piece in the row, 0 for padding) and ``positions`` (the token's position in its piece), the
inputs `Transformer` masks attention with. Per-token columns besides the tokens (the omni path's
modality ids) are packed alongside, padded with 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["pack"]


def pack(documents: Iterable, seq_len: int):
    """Rows ``{"tokens", [other columns], "segment_ids", "positions"}`` (each [seq_len] int64) from
    documents, each a list of token ids or a mapping of equal-length per-token columns with "tokens"."""
    columns: dict[str, np.ndarray] | None = None
    segments = np.zeros(seq_len, np.int64)
    positions = np.zeros(seq_len, np.int64)
    used, segment = 0, 0

    def row():
        return {
            **{k: v.copy() for k, v in columns.items()},
            "segment_ids": segments.copy(),
            "positions": positions.copy(),
        }

    def clear():
        for v in (*columns.values(), segments, positions):
            v[:] = 0

    for doc in documents:
        doc = (
            {k: np.asarray(v, np.int64) for k, v in doc.items()}
            if isinstance(doc, Mapping)
            else {"tokens": np.asarray(doc, np.int64)}
        )
        if columns is None:
            columns = {k: np.zeros(seq_len, np.int64) for k in doc}
        n = len(doc["tokens"])
        if used and used + n > seq_len:  # does not fit: close the row
            yield row()
            clear()
            used, segment = 0, 0
        start = 0
        while start < n:
            take = min(seq_len - used, n - start)
            segment += 1
            for k, v in doc.items():
                columns[k][used : used + take] = v[start : start + take]
            segments[used : used + take] = segment
            positions[used : used + take] = np.arange(take)
            used, start = used + take, start + take
            if used == seq_len:
                yield row()
                clear()
                used, segment = 0, 0
    if used:
        yield row()
