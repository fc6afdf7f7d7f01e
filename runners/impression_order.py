"""What the online trainer makes of the join's output: each request trained once, in impression-time order.

The join (`headrace.pipelines.ctr_stream`) writes a positive twice (early, then as the final decision), and
a join restored from a checkpoint writes again what it wrote after that checkpoint. Its examples are keyed by
``request_id <TAB> impression_time_ms <TAB> watermark_ms`` (`example_key`): `ImpressionOrder` keeps the
request ids it has let through, forgets those whose impression is more than `horizon` behind the join's
watermark (nothing of theirs can come again by then), and skips the others: an idempotent consumer.

A join that lags (a backlog at start-up, a slow topic) writes positives as their clicks are read and
negatives only when its watermark passes their windows: runs of one class. Examples are therefore held
until the join's watermark has passed their impression time, and let through in that order. The join's
watermark is what its final decisions carry (each was made once the watermark passed its window's end).
Examples without such a key (from another producer) pass through at once and are never deduplicated.
"""

from __future__ import annotations

import heapq

import numpy as np

from headrace.pipelines.ctr_stream import parse_example_key

__all__ = ["ImpressionOrder"]


class ImpressionOrder:
    def __init__(self, horizon_s: float):
        self.horizon_ms = int(horizon_s * 1000)
        self.watermark = 0
        self.duplicates = 0
        self._seen: dict[str, int] = {}
        self._held: list[tuple[int, int, int, bytes]] = []  # heap of (impression ms, reader, offset, line)

    def __len__(self) -> int:
        return len(self._held)

    def offer(self, key: bytes, reader: int, offset: int, line: bytes) -> bool:
        """Takes one message; True when it is to be trained now, False when it is held or a duplicate."""
        parsed = parse_example_key(key)
        if parsed is None:
            return True
        request_id, impression_ms, watermark_ms = parsed
        self.watermark = max(self.watermark, watermark_ms)
        if request_id in self._seen:
            self.duplicates += 1
            return False
        self._seen[request_id] = impression_ms
        if impression_ms <= self.watermark:
            return True
        heapq.heappush(self._held, (impression_ms, reader, offset, line))
        return False

    def release(self, everything: bool = False) -> list[tuple[int, int, bytes]]:
        """``(reader, offset, line)`` of the held examples the watermark has passed (`everything`: all
        of them), oldest impression first; forgets request ids beyond the horizon."""
        out = []
        while self._held and (everything or self._held[0][0] <= self.watermark):
            _, reader, offset, line = heapq.heappop(self._held)
            out.append((reader, offset, line))
        cutoff = self.watermark - self.horizon_ms
        if cutoff > 0 and len(self._seen) > 1024:
            self._seen = {r: t for r, t in self._seen.items() if t >= cutoff}
        return out

    def lowest(self, low: np.ndarray) -> np.ndarray:
        """`low` (per reader, the lowest offset not yet trained) lowered to the held examples' offsets."""
        low = np.asarray(low, np.int64).copy()
        for _, reader, offset, _ in self._held:
            low[reader] = min(low[reader], offset)
        return low

    def state(self) -> dict[str, np.ndarray]:
        """The request ids remembered and the held examples, for the trainer's checkpoint."""
        held = sorted(self._held)
        return {
            "seen_ids": np.array(list(self._seen), dtype=object),
            "seen_ms": np.array(list(self._seen.values()), np.int64),
            "held": np.array([h[3] for h in held], dtype=object),
            "held_where": np.array([h[:3] for h in held], np.int64).reshape(-1, 3),
            "watermark": np.int64(self.watermark),
            "duplicates": np.int64(self.duplicates),
        }

    def restore(self, seen_ids, seen_ms, held, held_where, watermark: int, duplicates: int) -> None:
        self._seen = {
            (r.decode() if isinstance(r, bytes) else str(r)): int(t)
            for r, t in zip(seen_ids, seen_ms, strict=True)
        }
        self._held = [
            (int(t), int(i), int(o), bytes(line)) for line, (t, i, o) in zip(held, held_where, strict=True)
        ]
        heapq.heapify(self._held)
        self.watermark, self.duplicates = int(watermark), int(duplicates)
