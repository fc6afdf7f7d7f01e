"""The online joiner of the streaming CTR path (Monolith): impressions + actions -> training examples.

Events (Kafka message values, UTF-8, tab-separated):

    impression:  request_id <TAB> event_time_ms <TAB> I1..I13, C1..C26 (the 39 raw Criteo fields)
    action:      request_id <TAB> event_time_ms <TAB> kind ("click")

Join, per request id, with state and event-time timers (`JoinImpressionsAndActions`):

* an impression opens a window of `join_window` seconds from its event time;
* a click inside the window makes a positive example at once (weight 1);
* when the watermark passes the window's end without a click, the impression becomes a negative, kept
  with probability `negative_keep_rate` (decided by a hash of the request id, so replays agree) and
  carrying weight ``1 / negative_keep_rate``: a model trained on the sample predicts the odds of the
  sample, and `correct_probability` (or training with the weights) gives back the true click rate;
* a click for a request whose window has closed (or that was never seen) is late: counted and emitted
  on the ``late`` output, not lost; a second click or a repeated impression is a duplicate, counted.
State is kept `grace` seconds past the window, so that a late click is recognised as late rather than
as an orphan, then cleared.

Examples are lines ``label <TAB> weight <TAB> 39 raw fields``: the Criteo layout with a weight, what the
online trainer reads from the examples topic.
"""

from __future__ import annotations

import dataclasses
import hashlib

import apache_beam as beam
from apache_beam.coders import BooleanCoder, PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

__all__ = [
    "Action",
    "Impression",
    "JoinImpressionsAndActions",
    "correct_probability",
    "keep_negative",
    "parse_action",
    "parse_impression",
    "replay_events",
]

NUM_FIELDS = 39


@dataclasses.dataclass(frozen=True)
class Impression:
    request_id: str
    time_ms: int
    fields: tuple[str, ...]  # the 39 raw Criteo fields


@dataclasses.dataclass(frozen=True)
class Action:
    request_id: str
    time_ms: int
    kind: str


class EventError(ValueError):
    """A malformed event; the message names the field."""


def parse_impression(value: bytes | str) -> Impression:
    text = value.decode("utf-8") if isinstance(value, bytes) else value
    parts = text.rstrip("\n").split("\t")
    if len(parts) != 2 + NUM_FIELDS:
        raise EventError(f"impression: expected {2 + NUM_FIELDS} tab-separated fields, got {len(parts)}")
    if not parts[0]:
        raise EventError("impression: empty request_id")
    try:
        time_ms = int(parts[1])
    except ValueError:
        raise EventError(f"impression: event_time_ms {parts[1]!r} is not an integer") from None
    return Impression(parts[0], time_ms, tuple(parts[2:]))


def parse_action(value: bytes | str) -> Action:
    text = value.decode("utf-8") if isinstance(value, bytes) else value
    parts = text.rstrip("\n").split("\t")
    if len(parts) != 3:
        raise EventError(f"action: expected 3 tab-separated fields, got {len(parts)}")
    try:
        time_ms = int(parts[1])
    except ValueError:
        raise EventError(f"action: event_time_ms {parts[1]!r} is not an integer") from None
    return Action(parts[0], time_ms, parts[2])


def replay_events(
    lines, *, start_ms: int, rate: float, mean_click_delay_s: float = 5.0, seed: int = 0, prefix: str = "r"
):
    """Impression and action events from Criteo-format lines, in event-time order.

    Line k is requested at ``start_ms + k / rate`` seconds: an impression carrying its 39 raw fields; if its
    label is 1, a click follows after an exponential delay of mean `mean_click_delay_s` (so some clicks
    arrive after any finite join window: the late ones). Yields ``(topic, event_time_ms, message)`` with
    topic "impressions" or "actions" and messages in the formats `parse_impression` / `parse_action` read.
    Malformed lines (not 40 fields, label not 0/1) are skipped, as ctr-ingest would reject them.
    """
    import heapq

    import numpy as np

    rng = np.random.default_rng(seed)
    pending: list[tuple[int, int, str]] = []  # clicks waiting for their time: (time, seq, message)
    seq = 0
    for k, line in enumerate(lines):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 1 + NUM_FIELDS or parts[0] not in ("0", "1"):
            continue
        t = start_ms + round(k * 1000 / rate)
        while pending and pending[0][0] <= t:
            when, _, message = heapq.heappop(pending)
            yield "actions", when, message
        rid = f"{prefix}{k}"
        yield "impressions", t, "\t".join([rid, str(t), *parts[1:]])
        if parts[0] == "1":
            when = t + int(rng.exponential(mean_click_delay_s) * 1000)
            heapq.heappush(pending, (when, seq, f"{rid}\t{when}\tclick"))
            seq += 1
    while pending:
        when, _, message = heapq.heappop(pending)
        yield "actions", when, message


def keep_negative(request_id: str, keep_rate: float) -> bool:
    """Whether a negative is kept: a hash of the request id below the rate (the same on every replay)."""
    if keep_rate >= 1.0:
        return True
    h = int.from_bytes(hashlib.sha1(request_id.encode()).digest()[:8], "big") / 2**64
    return h < keep_rate


def correct_probability(p, keep_rate: float):
    """The click probability before negative sampling from one predicted on the sample (log-odds shift:
    logit(p_true) = logit(p_sampled) + log(keep_rate)). Works on floats and numpy arrays."""
    odds = p / (1.0 - p) * keep_rate
    return odds / (1.0 + odds)


def example_line(impression: Impression, label: int, weight: float) -> str:
    return "\t".join([str(label), f"{weight:.6g}", *impression.fields])


class _Join(beam.DoFn):
    """Keyed by request id; elements are ``("impression", Impression)`` or ``("action", Action)``."""

    LATE = "late"
    IMPRESSION = ReadModifyWriteStateSpec("impression", PickleCoder())
    DONE = ReadModifyWriteStateSpec("done", BooleanCoder())  # example emitted (positive, or negative decided)
    CLOSED = ReadModifyWriteStateSpec("closed", BooleanCoder())  # the join window has ended
    WINDOW_END = TimerSpec("window_end", TimeDomain.WATERMARK)
    CLEANUP = TimerSpec("cleanup", TimeDomain.WATERMARK)

    def __init__(self, join_window_s: float, negative_keep_rate: float, grace_s: float):
        self._window_ms = int(join_window_s * 1000)
        self._grace_ms = int(grace_s * 1000)
        self._keep = negative_keep_rate
        metrics = beam.metrics.Metrics
        self._positives = metrics.counter("join", "positives")
        self._negatives = metrics.counter("join", "negatives_kept")
        self._dropped = metrics.counter("join", "negatives_dropped")
        self._late = metrics.counter("join", "late_actions")
        self._duplicates = metrics.counter("join", "duplicates")

    def process(
        self,
        element,
        impression_state=beam.DoFn.StateParam(IMPRESSION),
        done_state=beam.DoFn.StateParam(DONE),
        closed_state=beam.DoFn.StateParam(CLOSED),
        window_end=beam.DoFn.TimerParam(WINDOW_END),
        cleanup=beam.DoFn.TimerParam(CLEANUP),
    ):
        _, (kind, event) = element
        if kind == "impression":
            if impression_state.read() is not None:
                self._duplicates.inc()
                return
            impression_state.write(event)
            end = event.time_ms + self._window_ms
            window_end.set(Timestamp(micros=end * 1000))
            cleanup.set(Timestamp(micros=(end + self._grace_ms) * 1000))
            return
        # An action.
        impression = impression_state.read()
        if event.kind != "click":
            return
        if impression is None or closed_state.read() or event.time_ms > impression.time_ms + self._window_ms:
            self._late.inc()
            yield beam.pvalue.TaggedOutput(self.LATE, f"{event.request_id}\t{event.time_ms}\t{event.kind}")
            return
        if done_state.read():
            self._duplicates.inc()
            return
        done_state.write(True)
        self._positives.inc()
        yield example_line(impression, 1, 1.0)

    @on_timer(WINDOW_END)
    def _window_end(
        self,
        impression_state=beam.DoFn.StateParam(IMPRESSION),
        done_state=beam.DoFn.StateParam(DONE),
        closed_state=beam.DoFn.StateParam(CLOSED),
    ):
        closed_state.write(True)
        impression = impression_state.read()
        if impression is None or done_state.read():
            return
        done_state.write(True)
        if keep_negative(impression.request_id, self._keep):
            self._negatives.inc()
            yield example_line(impression, 0, 1.0 / self._keep)
        else:
            self._dropped.inc()

    @on_timer(CLEANUP)
    def _cleanup(
        self,
        impression_state=beam.DoFn.StateParam(IMPRESSION),
        done_state=beam.DoFn.StateParam(DONE),
        closed_state=beam.DoFn.StateParam(CLOSED),
    ):
        impression_state.clear()
        done_state.clear()
        closed_state.clear()


@beam.ptransform_fn
def JoinImpressionsAndActions(
    pcolls, *, join_window_s: float = 60.0, negative_keep_rate: float = 1.0, grace_s: float | None = None
):
    """``(impressions, actions)`` PCollections of `Impression` / `Action` (timestamped with their event
    time) -> ``{"examples": lines, "late": late action lines}``."""
    if not 0 < negative_keep_rate <= 1:
        raise ValueError(f"negative_keep_rate {negative_keep_rate}: must be in (0, 1]")
    impressions, actions = pcolls
    grace = join_window_s if grace_s is None else grace_s
    keyed = (
        impressions | "KeyImpressions" >> beam.Map(lambda i: (i.request_id, ("impression", i))),
        actions | "KeyActions" >> beam.Map(lambda a: (a.request_id, ("action", a))),
    ) | "Events" >> beam.Flatten()
    joined = keyed | "Join" >> beam.ParDo(_Join(join_window_s, negative_keep_rate, grace)).with_outputs(
        _Join.LATE, main="examples"
    )
    return {"examples": joined["examples"], "late": joined[_Join.LATE]}
