"""The online joiner of the streaming CTR path (Monolith): impressions + actions -> training examples.

Events (Kafka message values, UTF-8, tab-separated):

    impression:  request_id <TAB> event_time_ms <TAB> I1..I13, C1..C26 (the 39 raw Criteo fields)
    action:      request_id <TAB> event_time_ms <TAB> kind ("click")

Join, per request id, with state and event-time timers (`JoinImpressionsAndActions`):

* an impression opens a window of `join_window` seconds from its event time;
* a click inside the window makes a positive example at once (weight 1);
* when the watermark passes the window's end (plus an allowed lateness, for clicks still in flight) without
  a click, the impression becomes a negative, kept
  with probability `negative_keep_rate` (decided by a hash of the request id, so replays agree) and
  carrying weight ``1 / negative_keep_rate``: a model trained on the sample predicts the odds of the
  sample, and `correct_probability` (or training with the weights) gives back the true click rate;
* a click for a request whose window has closed (or that was never seen) is late: counted and emitted
  on the ``late`` output, not lost; a second click or a repeated impression is a duplicate, counted.
State is kept `grace` seconds past the window, so that a late click is recognised as late rather than
as an orphan, then cleared.

Examples are lines of `EXAMPLE_LINE`, ``label <TAB> weight <TAB> 39 raw fields``: the Criteo layout
with a weight, what the online trainer reads from the examples topic (with the same spec's checks and
parser).
"""

from __future__ import annotations

import dataclasses
import hashlib

import apache_beam as beam
from apache_beam.coders import BooleanCoder, PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

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
    return EXAMPLE_LINE.format([label, weight, *impression.fields])


_IMPRESSION = ReadModifyWriteStateSpec("impression", PickleCoder())
_DONE = ReadModifyWriteStateSpec("done", BooleanCoder())  # example emitted (positive, or negative decided)
_CLOSED = ReadModifyWriteStateSpec("closed", BooleanCoder())  # the join window has ended
_EARLY = ReadModifyWriteStateSpec("early", PickleCoder())  # a click that came before its impression


class _Join(beam.DoFn):
    """Keyed by request id; elements are ``("impression", Impression)`` or ``("action", Action)``.

    One event-time timer per request, so that what happens when never depends on the order in which a
    runner delivers two timers due in the same bundle (Flink's portable runner hands the SDK one timer
    family after the other: a clean-up timer due with the window's end ran first and the window then
    closed on nothing). The timer fires first when the watermark passes the window's end plus the allowed
    lateness (the window closes: a negative unless clicked), then `grace` later (the state is cleared)."""

    LATE = "late"
    DEADLINE = TimerSpec("deadline", TimeDomain.WATERMARK)

    def __init__(self, join_window_s: float, negative_keep_rate: float, grace_s: float, lateness_s: float):
        self._window_ms = int(join_window_s * 1000)
        self._grace_ms = int(grace_s * 1000)
        self._lateness_ms = int(lateness_s * 1000)
        self._keep = negative_keep_rate
        metrics = beam.metrics.Metrics
        self._positives = metrics.counter("join", "positives")
        self._negatives = metrics.counter("join", "negatives_kept")
        self._dropped = metrics.counter("join", "negatives_dropped")
        self._late = metrics.counter("join", "late_actions")
        self._duplicates = metrics.counter("join", "duplicates")

    @staticmethod
    def _at(ms: int) -> Timestamp:
        return Timestamp(micros=ms * 1000)

    def _state_ends(self, t_ms: int) -> Timestamp:
        """When a request's state is cleared, from its impression's (or an early click's) event time."""
        return self._at(t_ms + self._window_ms + self._lateness_ms + self._grace_ms)

    def _late_line(self, action: Action):
        self._late.inc()
        return beam.pvalue.TaggedOutput(
            self.LATE, (action.request_id, f"{action.request_id}\t{action.time_ms}\t{action.kind}")
        )

    def _positive(self, impression: Impression, done_state):
        done_state.write(True)
        self._positives.inc()
        return impression.request_id, example_line(impression, 1, 1.0)

    def process(
        self,
        element,
        impression_state=beam.DoFn.StateParam(_IMPRESSION),
        done_state=beam.DoFn.StateParam(_DONE),
        closed_state=beam.DoFn.StateParam(_CLOSED),
        early_state=beam.DoFn.StateParam(_EARLY),
        deadline=beam.DoFn.TimerParam(DEADLINE),
    ):
        _, (kind, event) = element
        if kind == "impression":
            if impression_state.read() is not None:
                self._duplicates.inc()
                return
            impression_state.write(event)
            end = event.time_ms + self._window_ms
            deadline.set(self._at(end + self._lateness_ms))
            early = early_state.read()
            if early is not None:  # the click was read before its impression (another partition)
                early_state.clear()
                if event.time_ms <= early.time_ms <= end:
                    yield self._positive(event, done_state)
                else:
                    yield self._late_line(early)
            return
        # An action.
        if event.kind != "click":
            return
        impression = impression_state.read()
        if impression is None:
            if closed_state.read():  # the impression's window is over (its state kept for `grace`)
                yield self._late_line(event)
            elif early_state.read() is not None:
                self._duplicates.inc()
            else:  # hold it until its impression arrives, or until a window past the click
                early_state.write(event)
                deadline.set(self._state_ends(event.time_ms))
            return
        if closed_state.read() or event.time_ms > impression.time_ms + self._window_ms:
            yield self._late_line(event)
            return
        if done_state.read():
            self._duplicates.inc()
            return
        yield self._positive(impression, done_state)

    @on_timer(DEADLINE)
    def _deadline(
        self,
        impression_state=beam.DoFn.StateParam(_IMPRESSION),
        done_state=beam.DoFn.StateParam(_DONE),
        closed_state=beam.DoFn.StateParam(_CLOSED),
        early_state=beam.DoFn.StateParam(_EARLY),
        deadline=beam.DoFn.TimerParam(DEADLINE),
    ):
        impression = impression_state.read()
        if impression is not None and not closed_state.read():
            # The window is over: a negative unless clicked; the state stays `grace` longer so that a
            # late click is recognised as late.
            closed_state.write(True)
            deadline.set(self._state_ends(impression.time_ms))
            if done_state.read():
                return
            done_state.write(True)
            if keep_negative(impression.request_id, self._keep):
                self._negatives.inc()
                yield impression.request_id, example_line(impression, 0, 1.0 / self._keep)
            else:
                self._dropped.inc()
            return
        # The end of the request's state; a click still waiting for its impression is late.
        early = early_state.read()
        if early is not None:
            yield self._late_line(early)
        for state in (impression_state, done_state, closed_state, early_state):
            state.clear()


_KEYED = beam.typehints.KV[str, beam.typehints.Any]  # request ids as UTF-8: a deterministic key coder


@beam.ptransform_fn
def JoinImpressionsAndActions(
    pcolls,
    *,
    join_window_s: float = 60.0,
    negative_keep_rate: float = 1.0,
    grace_s: float | None = None,
    allowed_lateness_s: float = 0.0,
):
    """``(impressions, actions)`` PCollections of `Impression` / `Action` (timestamped with their event
    time) -> ``{"examples": (request_id, example line), "late": (request_id, action line)}``.

    A window closes when the watermark passes its end plus `allowed_lateness_s`: a click inside the window
    by event time that reaches the join behind the watermark by less than that still joins."""
    if not 0 < negative_keep_rate <= 1:
        raise ValueError(f"negative_keep_rate {negative_keep_rate}: must be in (0, 1]")
    if allowed_lateness_s < 0:
        raise ValueError(f"allowed_lateness_s {allowed_lateness_s}: must be >= 0")
    impressions, actions = pcolls
    grace = join_window_s if grace_s is None else grace_s
    keyed = (
        impressions
        | "KeyImpressions" >> beam.Map(lambda i: (i.request_id, ("impression", i))).with_output_types(_KEYED),
        actions | "KeyActions" >> beam.Map(lambda a: (a.request_id, ("action", a))).with_output_types(_KEYED),
    ) | "Events" >> beam.Flatten()
    dofn = _Join(join_window_s, negative_keep_rate, grace, allowed_lateness_s)
    joined = keyed | "Join" >> beam.ParDo(dofn).with_outputs(_Join.LATE, main="examples")
    return {"examples": joined["examples"], "late": joined[_Join.LATE]}


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
    grace: float = dataclasses.field(
        default=-1.0, metadata={"help": "state kept past the window (-1: one window)"}
    )
    partitions: int = dataclasses.field(default=1, metadata={"help": "for topics the join creates"})
    allowed_lateness: float = dataclasses.field(
        default=2.0, metadata={"help": "seconds a window waits past the watermark for clicks in flight"}
    )
    start: str = dataclasses.field(
        default="earliest", metadata={"help": "where the join starts reading: earliest|latest"}
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
    """A Kafka record (with metadata) -> ``("impression", Impression)`` / ``("action", Action)``, or a line
    naming the topic, partition, offset and field on the ``rejected`` output."""

    REJECTED = "rejected"

    def __init__(self, impressions_topic: str):
        self._impressions = impressions_topic
        self._rejected = beam.metrics.Metrics.counter("join", "rejected_events")
        self._read = beam.metrics.Metrics.counter("join", "events_read")

    def process(self, record):
        self._read.inc()
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        try:
            if record.topic == self._impressions:
                yield "impression", parse_impression(record.value)
            else:
                yield "action", parse_action(record.value)
        except (EventError, UnicodeDecodeError) as exc:
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(self.REJECTED, (where, f"{where}: {exc}"))


def _encode(kv) -> tuple[bytes, bytes]:
    key, value = kv
    return key.encode("utf-8"), value.encode("utf-8")


def build_ctr_join(pipeline: beam.Pipeline, config: CtrJoinConfig, expansion_service: str) -> dict:
    """Kafka impressions + actions -> Kafka examples, late actions and rejected events.

    One cross-language ReadFromKafka over both topics, with the records' CreateTime as event time (the
    producer stamps it at send time): the watermark follows the producers, and on an idle partition it
    advances with the clock, so windows close when traffic pauses. The join is `JoinImpressionsAndActions`.
    The expansion service must expand the read as an UnboundedSource (``use_deprecated_read``, what
    `headrace stream ctr-join` does): on the portable Flink runner the SDF read's watermark never moved.
    """
    from apache_beam.io.kafka import ReadFromKafka, WriteToKafka

    if not 0 < config.negative_keep_rate <= 1:
        raise ValueError(f"--negative-keep-rate {config.negative_keep_rate}: must be in (0, 1]")
    records = pipeline | "ReadEvents" >> ReadFromKafka(
        # No group.id: with one, reading began only ~2 minutes after the job started (measured here);
        # the join keeps no offsets and starts from `start` (its state is not checkpointed either).
        consumer_config={"bootstrap.servers": config.bootstrap, "auto.offset.reset": config.start},
        topics=[config.impressions, config.actions],
        timestamp_policy=ReadFromKafka.create_time_policy,
        with_metadata=True,
        expansion_service=expansion_service,
    )
    parsed = records | "Parse" >> beam.ParDo(_ParseRecord(config.impressions)).with_outputs(
        _ParseRecord.REJECTED, main="events"
    )
    events = parsed["events"]
    impressions = events | "Impressions" >> beam.FlatMap(lambda e: [e[1]] if e[0] == "impression" else [])
    actions = events | "Actions" >> beam.FlatMap(lambda e: [e[1]] if e[0] == "action" else [])
    joined = (impressions, actions) | "Join" >> JoinImpressionsAndActions(
        join_window_s=config.join_window,
        negative_keep_rate=config.negative_keep_rate,
        grace_s=None if config.grace < 0 else config.grace,
        allowed_lateness_s=config.allowed_lateness,
    )
    producer = {"bootstrap.servers": config.bootstrap}
    for name, pcoll, topic in (
        ("Examples", joined["examples"], config.examples),
        ("Late", joined["late"], config.late),
        ("Rejected", parsed[_ParseRecord.REJECTED], config.rejected),
    ):
        (
            pcoll
            | f"Encode{name}" >> beam.Map(_encode).with_output_types(tuple[bytes, bytes])
            | f"Write{name}"
            >> WriteToKafka(producer_config=producer, topic=topic, expansion_service=expansion_service)
        )
    return joined
