"""Monolith's collisionless, expirable embedding table, and the per-id math of sparse updates (CowClip).

Ids. Every raw value becomes a 62-bit id, its hash mixed with a salt of its field's name (categorical
values: FarmHash Fingerprint64 of the string; integer fields: bucketed first as ``floor(ln(x)^2)`` for
x > 2, the transform of the Criteo winners), so equal values of different fields do not share an id. A
missing value is id 0. `criteo_ids` (training, from the CTR
shards) and `serving_ids` (serving, from 39 raw strings) produce the same ids by construction.

Rows. `CollisionlessTable` maps ids to rows of the embedding matrix through a hash table, never two ids to
one row while capacity lasts (no hashing of ids into buckets, hence no collisions). Row 0 is the null
row: missing values and ids not admitted read it, and it is never trained (always zero).
  * Admission (Monolith's frequency filter): an id gets a row only once it has been seen `min_count`
    times; until then its occurrences are counted exactly and it reads the null row.
  * Expiry: every row remembers when it was last used (a step or a clock value, the caller's choice);
    `expire` frees rows unused for `expire_after`, and forgets pending ids likewise. A freed row is
    reused by the next admitted id and re-initialised (the step sees it as `fresh`).
  * The table is a `tf.lookup.experimental.MutableHashTable` plus variables, so `tf.train.Checkpoint`
    saves and restores it with the model, and a SavedModel carries it for serving.

Where the table lives. The id -> row map is host state (lookups and insertions on the CPU, before each
step). The embedding matrix itself is a DVariable sharded on its embedding dimension over the mesh's
``model`` axis: DTensor refuses a gather from a matrix sharded on rows, and per-device row blocks would
need hand-written all-to-all exchanges. Every device holds every row, D / model columns of it. DTensor
has no layout propagation for in-place scatter updates (ResourceScatterUpdate), so a step writes the
touched rows back with `tf.tensor_scatter_nd_update` and an assign: an out-of-place copy of the matrix,
measured at 7 ms (2^16 rows), 20 ms (2^18) and 52 ms (2^20) per 16-wide table on this 2-core CPU. Large
batches (CowClip's regime) amortise it; `capacity` should be sized to the live ids, which expiry bounds.
"""

from __future__ import annotations

import tensorflow as tf

from headrace.models.criteo import CAT_FIELDS, FIELDS, INT_FIELDS

__all__ = [
    "CAT_FIELDS",
    "FIELDS",
    "INT_FIELDS",
    "CollisionlessTable",
    "cowclip",
    "criteo_ids",
    "hash_init",
    "serving_ids",
]

NULL_ID = 0
FREE = -1


def _bucket_int(x):
    """The Criteo winners' transform: x if x <= 2, else floor(ln(x)^2)."""
    xf = tf.cast(tf.maximum(x, 1), tf.float64)
    big = tf.cast(tf.floor(tf.square(tf.math.log(xf))), tf.int64)
    return tf.where(x > 2, big, x)


def _salt(name: str) -> int:
    """A fixed 63-bit salt per field name (FNV-1a of the name: stable across processes)."""
    h = 0xCBF29CE484222325
    for ch in name.encode():
        h = ((h ^ ch) * 0x100000001B3) & ((1 << 64) - 1)
    return h & ((1 << 63) - 1)


_INT_SALTS = [_salt(name) for name in INT_FIELDS]
_CAT_SALTS = [_salt(name) for name in CAT_FIELDS]


def _finish(h, present):
    """Mixed hashes -> ids in [1, 2^62), 0 where the value is missing."""
    ids = tf.bitwise.bitwise_and(_mix(h), (1 << 62) - 1)
    ids = tf.where(tf.equal(ids, 0), tf.ones_like(ids), ids)
    return tf.where(present, ids, tf.zeros_like(ids))


def _int_ids(values, present):
    """[B, 13] integers -> ids: bucketed, then mixed with the field's salt (no strings involved)."""
    return _finish(
        _bucket_int(values) * _i64(0x9E3779B97F4A7C15) + tf.constant(_INT_SALTS, tf.int64), present
    )


def _cat_ids(values, present):
    """[B, 26] strings -> ids: FarmHash Fingerprint64 of the value, mixed with the field's salt."""
    fingerprint = tf.strings.to_hash_bucket_fast(values, (1 << 63) - 1)
    return _finish(tf.bitwise.bitwise_xor(fingerprint, tf.constant(_CAT_SALTS, tf.int64)), present)


def criteo_ids(ints, int_missing, cats):
    """CTR-shard batch -> ids [B, 13 + 26] (int fields first). `ints`/`int_missing` [B, 13], `cats` [B, 26].

    A whole batch in a handful of ops: one fingerprint over the [B, 26] strings, integer mixing for the
    rest (an id per field and value, per the module docstring)."""
    return tf.concat(
        [_int_ids(ints, tf.equal(int_missing, 0)), _cat_ids(cats, tf.not_equal(cats, ""))], axis=1
    )


def serving_ids(fields: dict):
    """39 raw Criteo fields as [B] strings (``I1..I13``, ``C1..C26``; "" = missing) -> ids [B, 39].

    Equal to `criteo_ids` on the ingested form of the same line. A non-integer in an integer field is
    treated as missing (serving must answer; ingest would have rejected the line).
    """
    raw = tf.strings.strip(tf.stack([fields[name] for name in INT_FIELDS], axis=1))  # [B, 13]
    valid = tf.strings.regex_full_match(raw, r"-?[0-9]{1,18}")
    ints = tf.strings.to_number(tf.where(valid, raw, "0"), tf.int64)
    cats = tf.stack([fields[name] for name in CAT_FIELDS], axis=1)  # [B, 26]
    return tf.concat([_int_ids(ints, valid), _cat_ids(cats, tf.not_equal(cats, ""))], axis=1)


def _i64(c: int) -> int:
    """A 64-bit constant as the signed int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x, k: int):
    """Logical right shift of int64 (TensorFlow's right_shift is arithmetic on signed types)."""
    return tf.bitwise.bitwise_and(tf.bitwise.right_shift(x, k), (1 << (64 - k)) - 1)


def _mix(x):
    """splitmix64's finaliser in wrapping int64 arithmetic."""
    x = tf.bitwise.bitwise_xor(x, _shr(x, 30)) * _i64(0xBF58476D1CE4E5B9)
    x = tf.bitwise.bitwise_xor(x, _shr(x, 27)) * _i64(0x94D049BB133111EB)
    return tf.bitwise.bitwise_xor(x, _shr(x, 31))


def hash_init(ids, dim: int, scale: float):
    """Deterministic initial embeddings [U, dim] from ids: uniform(-scale, scale) by a splitmix64 hash of
    (id, column) in wrapping int64 arithmetic. Depends on nothing but the id, so it is the same on every
    mesh and in every order."""
    ids = tf.cast(ids, tf.int64)
    cols = tf.range(dim, dtype=tf.int64)
    x = _mix(ids[:, None] * _i64(0x9E3779B97F4A7C15) + cols[None, :] * _i64(0xD1B54A32D192ED03))
    unit = tf.cast(_shr(x, 11), tf.float64) / float(1 << 53)  # uniform in [0, 1)
    return tf.cast((unit * 2.0 - 1.0) * scale, tf.float32)


def cowclip(grads, weights, counts, ratio: float, zeta: float):
    """CowClip: clip each id's (duplicates already summed) gradient to cnt * max(ratio * ||w||, zeta).

    `grads`, `weights` [U, D]; `counts` [U], the id's occurrences in the batch.
    """
    w_norm = tf.norm(weights, axis=1)
    g_norm = tf.norm(grads, axis=1)
    limit = counts * tf.maximum(ratio * w_norm, zeta)
    scale = tf.minimum(1.0, limit / tf.maximum(g_norm, 1e-30))
    return grads * scale[:, None]


def _lookup(table, keys):
    values = table.lookup(keys)
    values.set_shape(keys.shape)  # hash table lookups lose the static shape
    return values


class CollisionlessTable(tf.Module):
    """id -> row map with exact frequency admission and expiry (see module docstring)."""

    def __init__(self, capacity: int, min_count: int = 1, expire_after: int = 0, name: str = "table"):
        super().__init__(name=name)
        if capacity < 2:
            raise ValueError("capacity must be >= 2 (row 0 is the null row)")
        self.capacity, self.min_count, self.expire_after = capacity, min_count, expire_after
        self.rows = tf.lookup.experimental.MutableHashTable(
            tf.int64, tf.int64, default_value=FREE, name="rows"
        )
        self.pending = tf.lookup.experimental.MutableHashTable(
            tf.int64, tf.int64, default_value=0, name="pending"
        )
        self.pending_seen = tf.lookup.experimental.MutableHashTable(
            tf.int64, tf.int64, default_value=0, name="pending_seen"
        )
        row_ids = tf.concat([[NULL_ID], tf.fill([capacity - 1], tf.constant(FREE, tf.int64))], axis=0)
        self.row_ids = tf.Variable(row_ids, trainable=False, name="row_ids")  # row -> id, FREE if free
        self.last_seen = tf.Variable(tf.zeros([capacity], tf.int64), trainable=False, name="last_seen")
        self.ids_filtered = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="ids_filtered")
        self.ids_admitted = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="ids_admitted")
        self.ids_expired = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="ids_expired")
        self.ids_refused = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="ids_refused")
        self._initialized = tf.Variable(False, trainable=False, name="initialized")

    def _ensure_null_row(self):
        if not self._initialized:
            self.rows.insert(tf.constant([NULL_ID], tf.int64), tf.constant([0], tf.int64))
            self._initialized.assign(True)

    @tf.function(reduce_retracing=True)
    def assign(self, ids, clock):
        """Rows for a batch of ids (any shape), admitting and refreshing as it goes.

        Returns (uniq_ids [U], uniq_rows [U], fresh [U] bool, counts [U] float32, inverse [ids.shape]):
        ``ids == uniq_ids[inverse]``; `fresh` marks rows assigned in this call (to be initialised).
        """
        self._ensure_null_row()
        clock = tf.cast(clock, tf.int64)
        flat = tf.reshape(tf.cast(ids, tf.int64), [-1])
        uniq, inverse, counts = tf.unique_with_counts(flat, out_idx=tf.int64)
        rows = _lookup(self.rows, uniq)
        unknown = rows < 0
        cand_ids = tf.boolean_mask(uniq, unknown)
        cand_total = _lookup(self.pending, cand_ids) + tf.boolean_mask(counts, unknown)
        admit = cand_total >= self.min_count
        admit_ids = tf.boolean_mask(cand_ids, admit)
        free_rows = tf.reshape(tf.where(tf.equal(self.row_ids, FREE)), [-1])
        n_new = tf.minimum(tf.size(admit_ids, out_type=tf.int64), tf.size(free_rows, out_type=tf.int64))
        new_ids, new_rows = admit_ids[:n_new], free_rows[:n_new]
        refused = admit_ids[n_new:]  # admitted but no free row: they stay pending, never collide
        self.rows.insert(new_ids, new_rows)
        self.row_ids.scatter_update(tf.IndexedSlices(new_ids, new_rows))
        self.pending.remove(new_ids)
        still = tf.concat([tf.boolean_mask(cand_ids, ~admit), refused], axis=0)
        still_total = tf.concat(
            [
                tf.boolean_mask(cand_total, ~admit),
                tf.fill(tf.shape(refused), tf.constant(self.min_count, tf.int64)),
            ],
            0,
        )
        self.pending.insert(still, tf.cast(still_total, tf.int64))
        self.pending_seen.insert(still, tf.fill(tf.shape(still), clock))
        rows = _lookup(self.rows, uniq)
        rows = tf.where(rows < 0, tf.zeros_like(rows), rows)
        self.last_seen.scatter_update(tf.IndexedSlices(tf.fill(tf.shape(rows), clock), rows))
        mark = tf.scatter_nd(new_rows[:, None], tf.ones_like(new_rows), [self.capacity])
        fresh = tf.gather(mark, rows) > 0
        filtered = tf.reduce_sum(tf.where((rows == 0) & (uniq != NULL_ID), counts, tf.zeros_like(counts)))
        self.ids_filtered.assign_add(filtered)
        self.ids_admitted.assign_add(n_new)
        self.ids_refused.assign_add(tf.size(refused, out_type=tf.int64))
        return uniq, rows, fresh, tf.cast(counts, tf.float32), tf.reshape(inverse, tf.shape(ids))

    @tf.function(reduce_retracing=True)
    def lookup(self, ids):
        """Rows for ids without admitting or refreshing anything (evaluation, serving): null if unknown."""
        rows = _lookup(self.rows, tf.cast(ids, tf.int64))
        return tf.where(rows < 0, tf.zeros_like(rows), rows)

    @tf.function
    def expire(self, clock):
        """Frees rows (and forgets pending ids) unused since `clock - expire_after`; returns rows freed."""
        clock = tf.cast(clock, tf.int64)
        if self.expire_after <= 0:
            return tf.constant(0, tf.int64)
        cutoff = clock - self.expire_after
        in_use = tf.range(self.capacity, dtype=tf.int64) > 0
        stale = in_use & (self.row_ids >= 0) & (self.last_seen < cutoff)
        stale_rows = tf.reshape(tf.where(stale), [-1])
        self.rows.remove(tf.gather(self.row_ids, stale_rows))
        self.row_ids.scatter_update(
            tf.IndexedSlices(tf.fill(tf.shape(stale_rows), tf.constant(FREE, tf.int64)), stale_rows)
        )
        keys, seen = self.pending_seen.export()
        keys.set_shape([None])
        seen.set_shape([None])
        old = tf.boolean_mask(keys, seen < cutoff)
        self.pending.remove(old)
        self.pending_seen.remove(old)
        n = tf.size(stale_rows, out_type=tf.int64)
        self.ids_expired.assign_add(n)
        return n

    def rows_used(self) -> int:
        return int(tf.reduce_sum(tf.cast(self.row_ids >= 0, tf.int64))) - 1  # without the null row

    def counters(self) -> dict:
        return {
            "table_rows_used": self.rows_used(),
            "table_capacity": self.capacity - 1,
            "ids_admitted": int(self.ids_admitted),
            "ids_filtered": int(self.ids_filtered),
            "ids_expired": int(self.ids_expired),
            "ids_refused_capacity": int(self.ids_refused),
        }
