"""The raw Criteo schema the CTR models read: 13 integer fields, then 26 categorical ones.

Kept apart from the models (no TensorFlow import), so that the ingest pipeline, the data generator and
the joiner name the same fields without loading TensorFlow in every Beam worker.
"""

from __future__ import annotations

__all__ = ["CAT_FIELDS", "FIELDS", "INT_FIELDS"]

INT_FIELDS = [f"I{i}" for i in range(1, 14)]
CAT_FIELDS = [f"C{i}" for i in range(1, 27)]
FIELDS = [*INT_FIELDS, *CAT_FIELDS]
