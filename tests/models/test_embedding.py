"""The collisionless table (admission, expiry, no collisions, checkpoints), id hashing, CowClip."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from headrace.models.embedding import CollisionlessTable, cowclip, criteo_ids, hash_init, serving_ids


def _assign(table, ids, clock):
    u, rows, fresh, counts, inv = table.assign(tf.constant(ids, tf.int64), tf.constant(clock, tf.int64))
    return (
        dict(zip(u.numpy().tolist(), rows.numpy().tolist())),
        set(u.numpy()[fresh.numpy()].tolist()),
        counts,
        inv,
    )


def test_admission_after_min_count_occurrences_exactly():
    table = CollisionlessTable(capacity=100, min_count=3)
    rows, fresh, _, _ = _assign(table, [7, 7, 8], 1)
    assert rows[7] == 0 and rows[8] == 0 and not fresh  # 7 seen twice: not yet
    rows, fresh, _, _ = _assign(table, [7, 8], 2)
    assert rows[7] > 0 and fresh == {7} and rows[8] == 0  # 7's third occurrence admits it
    rows, fresh, _, _ = _assign(table, [8, 8, 8, 0], 3)
    assert rows[8] > 0 and fresh == {8} and rows[0] == 0  # id 0 (missing) is always the null row
    c = table.counters()
    assert c["ids_admitted"] == 2 and c["ids_filtered"] == 2 + 1 + 1  # 7,7,8 then 8: read the null row


def test_no_two_ids_share_a_row_under_churn():
    rng = np.random.default_rng(0)
    table = CollisionlessTable(capacity=300, min_count=2, expire_after=20)
    for step in range(200):
        ids = rng.zipf(1.3, size=64) % 5000 + 1
        rows, _, _, _ = _assign(table, ids, step)
        live = {i: r for i, r in rows.items() if r > 0}
        assert len(set(live.values())) == len(live)
        if step % 10 == 9:
            table.expire(tf.constant(step, tf.int64))
        # The row -> id array and the id -> row map agree, and no row is held twice.
        keys, values = (t.numpy() for t in table.rows.export())
        held = values[values > 0]
        assert len(set(held.tolist())) == len(held)
        row_ids = table.row_ids.numpy()
        assert all(row_ids[r] == k for k, r in zip(keys, values) if r > 0)
    c = table.counters()
    assert c["ids_expired"] > 0 and c["table_rows_used"] <= 299


def test_expiry_frees_rows_and_reuses_them_fresh():
    table = CollisionlessTable(capacity=4, min_count=1, expire_after=5)
    rows, fresh, _, _ = _assign(table, [1, 2, 3], 0)
    assert sorted(rows.values()) == [1, 2, 3] and fresh == {1, 2, 3}
    rows, fresh, _, _ = _assign(table, [4], 1)
    assert rows[4] == 0 and table.counters()["ids_refused_capacity"] == 1  # full: refused, no collision
    _assign(table, [1], 10)
    assert int(table.expire(tf.constant(10, tf.int64))) == 2  # 2 and 3 unused since step 0
    rows, fresh, _, _ = _assign(table, [4, 2], 11)
    assert fresh == {4, 2} and {rows[4], rows[2]} == {2, 3}  # the freed rows, re-initialised
    assert table.rows_used() == 3 and table.lookup(tf.constant([3])).numpy()[0] == 0  # 3 was forgotten


def test_table_round_trips_through_a_checkpoint(tmp_path):
    table = CollisionlessTable(capacity=50, min_count=2)
    _assign(table, [5, 5, 6, 7, 7], 1)
    path = tf.train.Checkpoint(table=table).write(str(tmp_path / "ckpt"))
    restored = CollisionlessTable(capacity=50, min_count=2)
    tf.train.Checkpoint(table=restored).read(path).assert_consumed()
    np.testing.assert_array_equal(
        restored.lookup(tf.constant([5, 6, 7])), table.lookup(tf.constant([5, 6, 7]))
    )
    rows, fresh, _, _ = _assign(restored, [6], 2)  # 6's pending count survived: second sighting admits
    assert rows[6] > 0 and fresh == {6}


def test_inverse_and_counts_describe_the_batch():
    table = CollisionlessTable(capacity=10)
    ids = np.array([[3, 4, 3], [4, 0, 9]])
    u, _, _, counts, inv = table.assign(tf.constant(ids, tf.int64), tf.constant(0, tf.int64))
    np.testing.assert_array_equal(u.numpy()[inv.numpy()], ids)
    assert dict(zip(u.numpy().tolist(), counts.numpy().tolist())) == {3: 2.0, 4: 2.0, 0: 1.0, 9: 1.0}


def test_training_and_serving_ids_agree():
    ints = tf.constant([[5, -2, 0, 1000] + [1] * 9, [0] * 13], tf.int64)
    missing = tf.constant([[0, 0, 1, 0] + [0] * 9, [1] * 13], tf.int64)
    cats = tf.constant([["a1"] * 26, [""] * 25 + ["ff"]])
    train = criteo_ids(ints, missing, cats).numpy()
    raw = {
        f"I{k + 1}": tf.constant(
            ["" if m else str(v) for v, m in zip(ints[:, k].numpy(), missing[:, k].numpy())]
        )
        for k in range(13)
    }
    raw.update({f"C{k + 1}": cats[:, k] for k in range(26)})
    np.testing.assert_array_equal(serving_ids(raw).numpy(), train)
    assert train[1, :38].tolist() == [0] * 38 and train[1, 38] != 0  # missing -> 0
    assert len(set(train[0, 13:].tolist())) == 26  # the same value in different fields: different ids
    assert (
        train[0, 3]
        == criteo_ids(
            tf.constant([[1, 1, 1, 960] + [1] * 9], tf.int64), tf.zeros([1, 13], tf.int64), cats[:1]
        ).numpy()[0, 3]
    )  # same bucket


def test_hash_init_depends_on_the_id_only():
    a = hash_init(tf.constant([3, 9, 3], tf.int64), 8, 0.05).numpy()
    np.testing.assert_array_equal(a[0], a[2])
    assert not np.array_equal(a[0], a[1]) and np.abs(a).max() <= 0.05
    big = hash_init(tf.range(1, 20001, dtype=tf.int64), 4, 1.0).numpy()
    assert abs(big.mean()) < 0.02 and 0.3 < big.std() < 0.7  # uniform(-1, 1): std 0.577


def _cowclip_numpy(g, w, counts, r, zeta):
    out = g.copy()
    for i in range(len(g)):
        limit = counts[i] * max(r * np.linalg.norm(w[i]), zeta)
        norm = np.linalg.norm(g[i])
        if norm > limit:
            out[i] = g[i] * limit / norm
    return out


@pytest.mark.parametrize("r, zeta", [(1.0, 1e-5), (0.1, 1e-3), (10.0, 0.5)])
def test_cowclip_equals_numpy_reference(r, zeta):
    rng = np.random.default_rng(1)
    g = rng.normal(size=(50, 8)).astype(np.float32) * rng.uniform(0, 3, size=(50, 1)).astype(np.float32)
    w = rng.normal(size=(50, 8)).astype(np.float32) * 0.1
    w[:5] = 0  # zero embeddings: the zeta floor applies
    counts = rng.integers(1, 5, size=50).astype(np.float32)
    got = cowclip(tf.constant(g), tf.constant(w), tf.constant(counts), r, zeta).numpy()
    np.testing.assert_allclose(got, _cowclip_numpy(g, w, counts, r, zeta), rtol=1e-5, atol=1e-7)
