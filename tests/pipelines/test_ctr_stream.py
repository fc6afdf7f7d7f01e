"""The online joiner with TestStream: on-time and late clicks, duplicates, sampled and weighted negatives."""

from __future__ import annotations

import typing

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from headrace.pipelines.ctr_stream import (
    Action,
    EventError,
    Impression,
    JoinImpressionsAndActions,
    correct_probability,
    keep_negative,
    parse_action,
    parse_example_key,
    parse_impression,
)
from headrace.runners.beam_runner import create_pipeline

FIELDS = tuple(f"f{i}" for i in range(39))


def imp(rid: str, t: float) -> TimestampedValue:
    return TimestampedValue(Impression(rid, int(t * 1000), FIELDS), t)


def click(rid: str, t: float) -> TimestampedValue:
    return TimestampedValue(Action(rid, int(t * 1000), "click"), t)


class Record(typing.NamedTuple):  # the fields of KafkaIO's record row that the join reads
    topic: str
    partition: int
    offset: int
    value: bytes


def _run(events, *, window=10.0, keep=1.0, lateness=0.0):
    stream = TestStream()
    for step in events:
        if isinstance(step, int | float):
            stream = stream.advance_watermark_to(step)
        else:
            stream = stream.add_elements(step)
    stream = stream.advance_watermark_to_infinity()
    p = create_pipeline("BundleBasedDirectRunner", [], streaming=True)
    events_pc = p | stream
    parts = events_pc | beam.Partition(lambda e, n: 0 if isinstance(e, Impression) else 1, 2)
    joined = (parts[0], parts[1]) | JoinImpressionsAndActions(
        join_window_s=window, negative_keep_rate=keep, allowed_lateness_s=lateness
    )
    # The final decisions (one per request) and the early positives, keyed by request id.
    final = joined["examples"] | "Final" >> beam.FlatMap(
        lambda kv: [(parse_example_key(kv[0])[0], kv[1])] if parse_example_key(kv[0])[2] else []
    )
    early = joined["examples"] | "Early" >> beam.FlatMap(
        lambda kv: [(parse_example_key(kv[0])[0], kv[1])] if not parse_example_key(kv[0])[2] else []
    )
    return p, {"examples": final, "early": early, "late": joined["late"]}


def _line(label, weight, rid):
    return "\t".join([str(label), f"{weight:.6g}", *FIELDS]) + f"#{rid}"


def test_join_window_positives_negatives_late_and_duplicates():
    events = [
        [imp("a", 0), imp("b", 1), imp("c", 2)],
        [click("a", 3), click("d", 4)],  # d: a click without an impression
        [imp("e", 5), imp("f", 5), imp("f", 5.5)],  # f: the same impression twice
        [click("e", 6), click("e", 7)],  # e: a second click is a duplicate
        13,  # b's and c's windows (ending at 11 and 12) are over: negatives
        [click("c", 15)],  # c: clicked after its window closed: late, not a positive
        [click("g", 16)],  # g: the click is read before its impression (another partition) ...
        [imp("g", 15.5)],  # ... and joins when the impression comes: a positive
        40,
    ]
    p, joined = _run(events)
    assert_that(
        joined["examples"] | "Labels" >> beam.Map(lambda kv: kv[1].split("\t")[0] + kv[0]),
        equal_to(["1a", "1e", "1g", "0b", "0c", "0f"]),  # a, e, g positive; b, c, f negative
        label="labels",
    )
    # Positives are written early too, as soon as impression and click are both there (once each: e's
    # second click comes alone and does not fire the early trigger again).
    assert_that(
        joined["early"] | "EarlyIds" >> beam.Map(lambda kv: kv[0]), equal_to(["a", "e", "g"]), label="early"
    )
    assert_that(
        joined["late"] | beam.Map(lambda kv: kv[1].split("\t")[0]), equal_to(["c", "d"]), label="late"
    )
    # Exactly six examples: the duplicated impression (f) and the second click (e) add none. (The
    # BundleBasedDirectRunner reports no metrics in streaming mode; the join's counters show on Flink.)
    p.run().wait_until_finish()


@pytest.mark.parametrize("lateness, decided", [(0.0, "0"), (3.0, "1")])
def test_allowed_lateness_keeps_a_window_open_past_the_watermark(lateness, decided):
    # a's window ends at 10; its click (at 9, inside the window) reaches the join when the watermark is
    # already at 11: without allowed lateness a's session was decided at 10 (a negative, and the click does
    # not turn it into a positive afterwards); with 3 s of it the session is still open and a is a positive.
    events = [[imp("a", 0)], 11, [click("a", 9)], [imp("b", 20)], 1000]
    p, joined = _run(events, lateness=lateness)
    assert_that(
        joined["examples"] | "Decided" >> beam.Map(lambda kv: kv[0] + kv[1][0]),
        equal_to(["a" + decided, "b0"]),
        label="decided",
    )
    early = ["a"] if decided == "1" else []
    assert_that(joined["early"] | "EarlyIds" >> beam.Map(lambda kv: kv[0]), equal_to(early), label="early")
    p.run().wait_until_finish()


def test_negatives_sampled_and_weighted_recover_the_true_ctr():
    rng = np.random.default_rng(0)
    n, ctr, keep = 3000, 0.06, 0.2
    clicked = rng.uniform(size=n) < ctr
    impressions = [imp(f"r{i}", i * 0.01) for i in range(n)]
    clicks = [click(f"r{i}", i * 0.01 + 0.5) for i in range(n) if clicked[i]]
    p, joined = _run([impressions, clicks, 1000.0], window=5.0, keep=keep)
    true_ctr = clicked.mean()
    expected_negatives = sum(keep_negative(f"r{i}", keep) for i in range(n) if not clicked[i])
    positives = int(clicked.sum())

    def check(keyed):  # runs inside the pipeline, on every example
        lines = [line for _, line in keyed]
        labels = np.array([int(x.split("\t")[0]) for x in lines])
        weights = np.array([float(x.split("\t")[1]) for x in lines])
        assert labels.sum() == positives  # every click joined
        assert (labels == 0).sum() == expected_negatives
        assert set(weights[labels == 0]) == {1 / keep}
        sampled_ctr = labels.mean()
        assert sampled_ctr > 2 * true_ctr  # the sample over-represents clicks ...
        assert correct_probability(sampled_ctr, keep) == pytest.approx(
            true_ctr, rel=0.1
        )  # ... the shift undoes it
        assert np.sum(weights * labels) / np.sum(weights) == pytest.approx(true_ctr, rel=0.1)

    assert_that(joined["examples"], check)
    p.run().wait_until_finish()


def test_malformed_events_name_the_field():
    with pytest.raises(EventError, match="expected 41"):
        parse_impression("r1\t5\tonly-one-field")
    with pytest.raises(EventError, match="event_time_ms 'soon'"):
        parse_action("r1\tsoon\tclick")
    assert parse_action(b"r1\t5\tclick") == Action("r1", 5, "click")
    assert parse_impression("\t".join(["r1", "7", *FIELDS])).fields == FIELDS


def test_replay_turns_a_criteo_log_into_time_ordered_events(tmp_path):
    from headrace.pipelines.ctr_data import generate
    from headrace.pipelines.ctr_stream import replay_events

    generate(tmp_path / "log.tsv", 2000, seed=3, malformed_every=500)
    lines = (tmp_path / "log.tsv").read_text().splitlines()
    events = list(replay_events(lines, start_ms=10_000, rate=100.0, mean_click_delay_s=2.0, seed=1))
    times = [t for _, t, _ in events]
    assert times == sorted(times)  # event-time order across both topics
    impressions = [parse_impression(m) for topic, _, m in events if topic == "impressions"]
    actions = [parse_action(m) for topic, _, m in events if topic == "actions"]
    valid = [line for line in lines if len(line.split("\t")) == 40 and line.split("\t")[0] in ("0", "1")]
    assert len(impressions) == len(valid) < len(lines)  # malformed lines are not replayed
    assert len(actions) == sum(line.startswith("1\t") for line in valid) > 0
    by_id = {i.request_id: i for i in impressions}
    delays = np.array([a.time_ms - by_id[a.request_id].time_ms for a in actions]) / 1000
    assert (delays >= 0).all() and 1.5 < delays.mean() < 2.5  # exponential, mean 2 s
    assert impressions[1].time_ms - impressions[0].time_ms == 10  # 100 requests per second


def test_kafka_records_parse_or_land_in_rejected_naming_the_record(fnapi_pipeline):
    """What `stream ctr-join` does with each Kafka record before the join (records as KafkaIO gives them):
    one parser per topic, events keyed by request id and stamped with their event time."""
    from headrace.pipelines.ctr_stream import _ParseRecord

    impressions = [
        Record("imps", 0, 0, "\t".join(["r1", "7000", *FIELDS]).encode()),
        Record("imps", 1, 5, b"r2\tnot-a-time\t" + b"\t".join(f.encode() for f in FIELDS)),
        Record("imps", 1, 6, "\t".join(["r2", "7", *FIELDS[:-1]]).encode()),
    ]
    actions = [
        Record("acts", 0, 0, b"r1\t9000\tclick"),
        Record("acts", 0, 1, b"r3\t9"),
        Record("acts", 0, 2, b"\xff\xfe"),
    ]
    reasons = {
        "imps[1]@5": "event_time_ms 'not-a-time'",
        "imps[1]@6": "expected 41 tab-separated fields, got 40",
        "acts[0]@1": "expected 3",
        "acts[0]@2": "utf-8",
    }
    with fnapi_pipeline() as p:
        for kind, records in (("impression", impressions), ("action", actions)):
            parsed = (
                p
                | f"{kind}s" >> beam.Create(records)
                | f"Parse{kind}"
                >> beam.ParDo(_ParseRecord(kind)).with_outputs(_ParseRecord.REJECTED, main="events")
            )
            assert_that(
                parsed["events"]
                | f"Stamp{kind}"
                >> beam.Map(lambda kv, t=beam.DoFn.TimestampParam: (kv[0], kv[1][0], kv[1][1], t.micros)),
                equal_to(
                    [("r1", "i", 7000, 7_000_000)] if kind == "impression" else [("r1", "c", 9000, 9_000_000)]
                ),
                label=f"events-{kind}",
            )
            assert_that(
                parsed[_ParseRecord.REJECTED]
                | f"Why{kind}"
                >> beam.Map(lambda kv: (kv[0], reasons[kv[0]] in kv[1] and kv[1].startswith(kv[0] + ": "))),
                equal_to([(where, True) for where in reasons if where.startswith(kind[:3])]),
                label=f"rejected-{kind}",
            )
