"""The online trainer's idempotent, impression-ordered view of the join's output (`ImpressionOrder`)."""

from __future__ import annotations

import numpy as np

from headrace.pipelines.ctr_stream import example_key
from headrace.runners.impression_order import ImpressionOrder


def _offer(order, rid, t, wm, offset, label=b"1"):
    return order.offer(example_key(rid, t, wm).encode(), 0, offset, label + b"\t" + rid.encode())


def test_each_request_once_and_in_impression_order_as_the_watermark_passes():
    order = ImpressionOrder(horizon_s=10)
    # A lagging join: early positives (watermark 0) come before the negatives of older impressions.
    assert not _offer(order, "p3", 3000, 0, 0)
    assert not _offer(order, "p2", 2000, 0, 1)
    assert order.release() == [] and len(order) == 2
    # The final decision for n1 (window end 1500) lets through what is older than 1500: nothing held.
    assert _offer(order, "n1", 1000, 1500, 2, b"0")
    assert order.release() == []
    # A final at watermark 2600 lets p2 through; p3 waits; p2's final is a duplicate.
    assert _offer(order, "n2", 2100, 2600, 3, b"0")
    assert not _offer(order, "p2", 2000, 2600, 4)
    assert [o for _, o, _ in order.release()] == [1]
    assert order.duplicates == 1 and len(order) == 1
    assert order.lowest(np.array([9])).tolist() == [0]  # p3 (offset 0) is not trained yet
    assert [o for _, o, _ in order.release(everything=True)] == [0]
    # Keys that are not the join's pass through and are never deduplicated.
    assert order.offer(b"", 0, 5, b"x") and order.offer(b"", 0, 6, b"x")


def test_request_ids_are_forgotten_beyond_the_horizon_and_the_state_round_trips():
    order = ImpressionOrder(horizon_s=1)
    for k in range(2000):
        _offer(order, f"r{k}", k * 10, k * 10 + 5, k)
    order.release()
    state = order.state()
    assert len(state["seen_ids"]) < 200  # only ids within 1 s of the watermark (19,995 ms) remain
    assert not _offer(order, "r1999", 19990, 20000, 2001)  # a recent one is still a duplicate
    assert _offer(order, "r5", 50, 20000, 2002)  # a forgotten one is not (the horizon must cover replays)
    again = ImpressionOrder(horizon_s=1)
    _offer(order, "later", 30000, 0, 2003)  # held
    again.restore(**order.state())
    assert again.state()["held"].tolist() == [b"1\tlater"]
    assert not _offer(again, "r1999", 19990, 20000, 2004) and again.duplicates == order.duplicates + 1
    assert again.watermark == order.watermark == 20000
