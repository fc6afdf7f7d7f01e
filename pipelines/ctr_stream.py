"""The online joiner of the streaming CTR path (Monolith): impressions + actions -> training examples.

Events (Kafka message values, UTF-8, tab-separated):

    impression:  request_id <TAB> event_time_ms <TAB> I1..I13, C1..C26 (the 39 raw Criteo fields)
    action:      request_id <TAB> event_time_ms <TAB> kind ("click")

Join, per request id, in the runner's own GroupByKey (`JoinKeyedEvents`): session windows per request
id whose gap is the join window plus the allowed lateness, so an impression's click merges into its session:

* a click inside the window (``t <= click <= t + join_window``) makes a positive (weight 1), written at
  once by an early firing (impression and click both there) and again as the final decision;
* when the watermark passes the session, the final decision is written: a positive, or a negative
  kept with probability `negative_keep_rate` (decided by a hash of the request id, so replays agree) and
  carrying weight ``1 / negative_keep_rate``: a model trained on the sample predicts the odds of the
  sample, and `correct_probability` (or training with the weights) gives back the true click rate;
* a click outside its impression's window (or with no impression) is late: emitted on the ``late``
  output, not lost; a second click or a repeated impression is a duplicate, counted.

Only the decision per pane runs in Python; Flink keeps the state and fires the windows. Examples are keyed
by `example_key` (request id, impression time, and for a final decision the watermark it was made at):
the online trainer trains the first example per request id and orders them by impression time.

Examples are lines of `EXAMPLE_LINE`, ``label <TAB> weight <TAB> 39 raw fields``: the Criteo layout
with a weight, what the online trainer reads from the examples topic (with the same spec's checks and
parser).
"""

from __future__ import annotations

import dataclasses
import hashlib

import apache_beam as beam
from apache_beam.utils.windowed_value import PaneInfoTiming

from headrace.core import config as config_lib
from headrace.models.criteo import FIELDS
from headrace.transforms.line_spec import Column, LineSpec

__all__ = [
    "EXAMPLE_LINE",
    "Action",
    "CtrJoinConfig",
    "Impression",
    "JoinImpressionsAndActions",
    "ReplayConfig",
    "build_ctr_join",
    "correct_probability",
    "keep_negative",
    "parse_action",
    "parse_impression",
    "replay_events",
    "split_impression",
]

NUM_FIELDS = len(FIELDS)

# The examples topic: one line per example, written by the join, read by the online trainer.
EXAMPLE_LINE = LineSpec(
    "ctr_example",
    [
        Column("label", "int", choices=("0", "1"), description="1 = clicked within the join window"),
        Column("weight", "float", positive=True, description="1 / the negative keep rate for negatives"),
        *(Column(name) for name in FIELDS),
    ],
)


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


def split_impression(value: bytes | str) -> tuple[str, int, str]:
    """``(request_id, event_time_ms, the 39 raw fields still tab-joined)``: the checks of
    `parse_impression` without splitting the fields (what the join carries)."""
    text = value.decode("utf-8") if isinstance(value, bytes) else value
    parts = text.rstrip("\n").split("\t", 2)
    got = len(parts) if len(parts) < 3 else 3 + parts[2].count("\t")
    if got != 2 + NUM_FIELDS:
        raise EventError(f"impression: expected {2 + NUM_FIELDS} tab-separated fields, got {got}")
    if not parts[0]:
        raise EventError("impression: empty request_id")
    try:
        time_ms = int(parts[1])
    except ValueError:
        raise EventError(f"impression: event_time_ms {parts[1]!r} is not an integer") from None
    return parts[0], time_ms, parts[2]


def parse_impression(value: bytes | str) -> Impression:
    request_id, time_ms, fields = split_impression(value)
    return Impression(request_id, time_ms, tuple(fields.split("\t")))


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
    return _example_text(label, weight, "\t".join(impression.fields))


def _example_text(label: int, weight: float, fields: str) -> str:
    """An `EXAMPLE_LINE` from the 39 raw fields as they came, tab-joined (no split and join per example)."""
    return f"{label}\t{weight:.6g}\t{fields}"


def example_key(request_id: str, impression_ms: int, watermark_ms: int) -> str:
    """The examples topic's message key: ``request_id <TAB> impression_time_ms <TAB> watermark_ms``.

    `watermark_ms` is 0 on an early positive and, on a final decision, the end of the request's window:
    the join emits a final decision only once its watermark has passed that, so it is a lower bound of
    the join's watermark the trainer can read (`train ctr --online` orders examples by it)."""
    return f"{request_id}\t{impression_ms}\t{watermark_ms}"


def parse_example_key(key: bytes | str) -> tuple[str, int, int] | None:
    """``(request_id, impression_time_ms, watermark_ms)``, or None for a key that is not one (no key, a
    bare request id: examples that did not come from this join)."""
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    parts = text.split("\t")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


class _Decide(beam.DoFn):
    """One pane of a request's session (all its events so far) -> examples and late actions.

    An early pane (the watermark is still inside the session) makes a positive as soon as an impression
    and a click inside its window are both there: freshness. The on-time pane (the watermark has passed
    the session; it fires once, with every event of the request) makes the final decision: one example
    (positive, or a negative kept by the sample) and a late action for every click outside the window.
    A positive is therefore written twice, early and final, with the same line; the trainer trains the
    first one per request id (its keys say which is which)."""

    LATE = "late"

    def __init__(self, join_window_ms: int, negative_keep_rate: float):
        self._window_ms = join_window_ms
        self._keep = negative_keep_rate
        metrics = beam.metrics.Metrics
        self._positives = metrics.counter("join", "positives")
        self._early = metrics.counter("join", "early_positives")
        self._negatives = metrics.counter("join", "negatives_kept")
        self._dropped = metrics.counter("join", "negatives_dropped")
        self._late = metrics.counter("join", "late_actions")
        self._duplicates = metrics.counter("join", "duplicates")
        self._requests = metrics.distribution("join", "events_per_request")

    def process(self, element, window=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam):
        request_id, events = element
        impressions, clicks = [], []
        for kind, time_ms, rest in events:
            if kind == "i":
                impressions.append((time_ms, rest))
            elif rest == "click":
                clicks.append(time_ms)
        impressions.sort()
        clicks.sort()
        final = pane.timing != PaneInfoTiming.EARLY
        impression = impressions[0] if impressions else None
        inside = []
        if impression is not None:
            t = impression[0]
            inside = [c for c in clicks if t <= c <= t + self._window_ms]
        if not final:
            if inside:
                self._early.inc()
                yield example_key(request_id, impression[0], 0), _example_text(1, 1.0, impression[1])
            return
        self._requests.update(len(impressions) + len(clicks))
        self._duplicates.inc(max(len(impressions) - 1, 0) + max(len(inside) - 1, 0))
        if impression is not None:
            key = example_key(request_id, impression[0], window.end.micros // 1000)
            if inside:
                self._positives.inc()
                yield key, _example_text(1, 1.0, impression[1])
            elif keep_negative(request_id, self._keep):
                self._negatives.inc()
                yield key, _example_text(0, 1.0 / self._keep, impression[1])
            else:
                self._dropped.inc()
        for c in clicks:
            if c not in inside:
                self._late.inc()
                yield beam.pvalue.TaggedOutput(self.LATE, (request_id, f"{request_id}\t{c}\tclick"))


# Grouped values: ("i", impression_time_ms, the 39 raw fields tab-joined) or ("c", action_time_ms, kind):
# tuples of str and int (Beam's fast primitive coder), never pickled objects.
_EVENT = beam.typehints.KV[str, beam.typehints.Tuple[str, int, str]]


@beam.ptransform_fn
def JoinKeyedEvents(
    events, *, join_window_s: float = 60.0, negative_keep_rate: float = 1.0, allowed_lateness_s: float = 0.0
):
    """``(request_id, (kind, time_ms, payload))`` events, timestamped with their event time ->
    ``{"examples": (example_key, example line), "late": (request_id, action line)}``.

    The grouping and the event-time firing are the runner's own: session windows per request id with the
    join window plus `allowed_lateness_s` as the gap (a click inside the window merges into its
    impression's session), a trigger that fires early when a second event comes (an impression and its
    click) and once when the watermark passes the session, accumulating panes, no allowed lateness past
    that (the session's state is gone once decided). Only the decision per pane runs in Python (`_Decide`).
    An event behind the watermark by more than its own session's gap is dropped by the runner (Flink
    counts it as ``numLateRecordsDropped``); a click within that is decided as late."""
    from apache_beam.transforms import trigger, window

    if not 0 < negative_keep_rate <= 1:
        raise ValueError(f"negative_keep_rate {negative_keep_rate}: must be in (0, 1]")
    if allowed_lateness_s < 0:
        raise ValueError(f"allowed_lateness_s {allowed_lateness_s}: must be >= 0")
    window_ms = int(join_window_s * 1000)
    gap_s = (window_ms + int(allowed_lateness_s * 1000) + 1) / 1000  # a click at t + window still merges
    sessions = events | "Sessions" >> beam.WindowInto(
        window.Sessions(gap_s),
        trigger=trigger.AfterWatermark(early=trigger.AfterCount(2)),
        accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
        allowed_lateness=0,
    )
    decided = (
        sessions
        | "GroupByRequest" >> beam.GroupByKey()
        | "Decide"
        >> beam.ParDo(_Decide(window_ms, negative_keep_rate)).with_outputs(_Decide.LATE, main="examples")
    )
    return {"examples": decided["examples"], "late": decided[_Decide.LATE]}


@beam.ptransform_fn
def JoinImpressionsAndActions(
    pcolls, *, join_window_s: float = 60.0, negative_keep_rate: float = 1.0, allowed_lateness_s: float = 0.0
):
    """``(impressions, actions)`` PCollections of `Impression` / `Action` (timestamped with their event
    time) -> ``{"examples": (example_key, example line), "late": (request_id, action line)}``: the events
    keyed by request id, then `JoinKeyedEvents`.

    A window closes when the watermark passes its end plus `allowed_lateness_s`: a click inside the window
    by event time that reaches the join behind the watermark by less than that still joins."""
    impressions, actions = pcolls
    keyed = (
        impressions
        | "KeyImpressions"
        >> beam.Map(lambda i: (i.request_id, ("i", i.time_ms, "\t".join(i.fields)))).with_output_types(
            _EVENT
        ),
        actions
        | "KeyActions"
        >> beam.Map(lambda a: (a.request_id, ("c", a.time_ms, a.kind))).with_output_types(_EVENT),
    ) | "Events" >> beam.Flatten()
    return keyed | "Join" >> JoinKeyedEvents(
        join_window_s=join_window_s,
        negative_keep_rate=negative_keep_rate,
        allowed_lateness_s=allowed_lateness_s,
    )


# -------------------------------------------------------------------------------------------------
# On Kafka: `headrace stream ctr-join`
# -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CtrJoinConfig:
    bootstrap: str = dataclasses.field(default="127.0.0.1:9092", metadata={"help": "Kafka HOST:PORT"})
    impressions: str = "impressions"
    actions: str = "actions"
    examples: str = "examples"
    late: str = dataclasses.field(default="late-actions", metadata={"help": "topic for late actions"})
    rejected: str = dataclasses.field(default="rejected-events", metadata={"help": "malformed events"})
    join_window: float = dataclasses.field(default=60.0, metadata={"help": "seconds from an impression"})
    negative_keep_rate: float = 1.0
    partitions: int = dataclasses.field(default=1, metadata={"help": "for topics the join creates"})
    allowed_lateness: float = dataclasses.field(
        default=2.0, metadata={"help": "seconds a window waits past the watermark for clicks in flight"}
    )
    start: str = dataclasses.field(
        default="earliest", metadata={"help": "where a join with no checkpoint starts: earliest|latest"}
    )
    group: str = dataclasses.field(
        default="headrace-ctr-join", metadata={"help": "Kafka consumer group its offsets are committed to"}
    )
    checkpoint_dir: str = dataclasses.field(
        default="", metadata={"help": "Flink checkpoints here; a restarted join resumes from the newest"}
    )
    checkpoint_interval: float = dataclasses.field(
        default=5.0, metadata={"help": "seconds between checkpoints"}
    )
    bundle_time: float = dataclasses.field(
        default=0.1, metadata={"help": "seconds a Flink bundle stays open at most (Flink's default: 1)"}
    )


@config_lib.register("ctr-join", command="stream ctr-join")
def ctr_join() -> CtrJoinConfig:
    """Join impressions and clicks from Kafka within 60 s, keep every negative."""
    return CtrJoinConfig()


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    input: str = dataclasses.field(default="", metadata={"help": "a Criteo-format TSV log"})
    bootstrap: str = "127.0.0.1:9092"
    impressions: str = "impressions"
    actions: str = "actions"
    rate: float = dataclasses.field(default=1000.0, metadata={"help": "impressions per second"})
    mean_click_delay: float = dataclasses.field(default=5.0, metadata={"help": "seconds, exponential"})
    limit: int = dataclasses.field(default=0, metadata={"help": "replay at most this many lines (0: all)"})
    seed: int = 0
    prefix: str = dataclasses.field(default="r", metadata={"help": "request ids are PREFIX<line number>"})
    log_every_seconds: float = 10.0


@config_lib.register("replay", command="stream replay")
def replay() -> ReplayConfig:
    """Replay a Criteo log at 1,000 impressions/s with clicks 5 s later on average."""
    return ReplayConfig()


class _ParseRecord(beam.DoFn):
    """A Kafka record (with metadata) of one topic -> ``(request_id, (kind, time_ms, payload))``
    timestamped with the event time in the message (what `JoinKeyedEvents` groups), or a line naming
    the topic, partition, offset and field on the ``rejected`` output. Impressions are checked (field
    count, time) but not split into their fields: the example line carries them as they came."""

    REJECTED = "rejected"

    def __init__(self, kind: str):
        if kind not in ("impression", "action"):
            raise ValueError(f"kind {kind!r}: impression|action")
        self._kind = kind
        self._rejected = beam.metrics.Metrics.counter("join", "rejected_events")
        self._read = beam.metrics.Metrics.counter("join", f"{kind}s_read")

    def _parse(self, value: bytes):
        text = value.decode("utf-8")
        if self._kind == "action":
            action = parse_action(text)
            return action.request_id, ("c", action.time_ms, action.kind)
        request_id, time_ms, fields = split_impression(text)
        return request_id, ("i", time_ms, fields)

    def process(self, record):
        self._read.inc()
        try:
            keyed = self._parse(record.value)
        except (EventError, UnicodeDecodeError) as exc:
            self._rejected.inc()
            where = f"{record.topic}[{record.partition}]@{record.offset}"
            yield beam.pvalue.TaggedOutput(self.REJECTED, (where, f"{where}: {exc}"))
            return
        yield beam.window.TimestampedValue(keyed, keyed[1][1] / 1000)


def _encode(kv) -> tuple[bytes, bytes]:
    key, value = kv
    return key.encode("utf-8"), value.encode("utf-8")


def build_ctr_join(pipeline: beam.Pipeline, config: CtrJoinConfig, expansion_service: str) -> dict:
    """Kafka impressions + actions -> Kafka examples, late actions and rejected events.

    One cross-language ReadFromKafka per topic, so that the join's watermark is the minimum of the two
    (and, within a read, of its partitions): the faster topic cannot close windows the slower one still
    has events for. Records carry their CreateTime (the producer stamps the event time); the elements are
    re-stamped with the event time in the message. Offsets are committed to `group` when a checkpoint is
    finalised (what the group's lag shows); a restarted join resumes from its Flink checkpoint, not from
    them. The expansion service must expand the reads as UnboundedSources (``use_deprecated_read``, what
    `headrace stream ctr-join` does): on the portable Flink runner the SDF read's watermark never moved.
    """
    from apache_beam.io.kafka import ReadFromKafka, WriteToKafka

    if not 0 < config.negative_keep_rate <= 1:
        raise ValueError(f"--negative-keep-rate {config.negative_keep_rate}: must be in (0, 1]")
    consumer = {
        "bootstrap.servers": config.bootstrap,
        "auto.offset.reset": config.start,
        "group.id": config.group,
    }
    events, rejected = [], []
    for kind, topic in (("impression", config.impressions), ("action", config.actions)):
        name = kind.capitalize() + "s"
        records = pipeline | f"Read{name}" >> ReadFromKafka(
            consumer_config=consumer,
            topics=[topic],
            timestamp_policy=ReadFromKafka.create_time_policy,
            with_metadata=True,
            commit_offset_in_finalize=True,
            expansion_service=expansion_service,
        )
        parsed = records | f"Parse{name}" >> beam.ParDo(_ParseRecord(kind)).with_outputs(
            _ParseRecord.REJECTED, main="events"
        )
        events.append(parsed["events"])
        rejected.append(parsed[_ParseRecord.REJECTED])
    joined = (
        events
        | "Events" >> beam.Flatten().with_output_types(_EVENT)
        | "Join"
        >> JoinKeyedEvents(
            join_window_s=config.join_window,
            negative_keep_rate=config.negative_keep_rate,
            allowed_lateness_s=config.allowed_lateness,
        )
    )
    producer = {"bootstrap.servers": config.bootstrap}
    for name, pcoll, topic in (
        ("Examples", joined["examples"], config.examples),
        ("Late", joined["late"], config.late),
        ("Rejected", rejected | "AllRejected" >> beam.Flatten(), config.rejected),
    ):
        (
            pcoll
            | f"Encode{name}" >> beam.Map(_encode).with_output_types(tuple[bytes, bytes])
            | f"Write{name}"
            >> WriteToKafka(producer_config=producer, topic=topic, expansion_service=expansion_service)
        )
    return joined
