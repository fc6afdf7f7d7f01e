"""Benchmark: the online trainer on a real Kafka broker: sustained examples/s, freshness, AUC vs batch.

    python bench/streaming.py [--lines 40000] [--rate 2000] [--syncs 1,5] [--model fm]
    python bench/streaming.py --production --join-rate 1000 --join-lines 30000   (the issue-17 table)

A producer sends joined examples (label, weight, 39 raw fields: what `stream ctr-join` writes) to a topic
at --rate per second and records when each was sent; `headrace train ctr --online` trains from the topic
and publishes serving copies every --sync-every seconds (dense weights every 2x that). For every example,
the latency is the time from its send to the publication of the first serving copy trained on it and on
everything before it (the trainer's syncs.jsonl: `trained_below`), reported as p50 / p95. The trainer
draws batches from a shuffle buffer (default 4096 examples, at most 10 s wait); a row with
`--shuffle-buffer 0` shows what that costs in freshness. A last run sends everything at once to measure what
the trainer sustains (examples/s over the time it works: reading, training, publishing, checkpointing;
waits for data excluded). The AUC rows compare, on held-out later examples, the final serving copy with a
batch model trained once on the first 10% of the stream (Monolith's online-vs-batch comparison).

A last section replays a Criteo log through `stream ctr-join` on Flink into the trainer and reports,
for every click that made a positive, the time from the click entering Kafka to the first serving copy
trained on it and on everything before it (`--join-only` runs just that), and that copy's held-out AUC
(few examples, so a low one: a batch model on as many gets about the same).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from headrace.models import metrics as metrics_lib
from headrace.pipelines.ctr_data import generate
from headrace.runners import stack

_PRODUCE = """
import json, os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
from headrace.runners.kafka import KafkaProducer
bootstrap, topic, path, rate, out = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
producer = KafkaProducer(bootstrap, linger_ms=1)
lines = open(path).read().splitlines()
sent = []
start = time.time()
for k, line in enumerate(lines):
    if rate > 0:
        wait = start + k / rate - time.time()
        if wait > 0:
            time.sleep(wait)
    producer.send(topic, line)
    sent.append(time.time())
    if k % 500 == 499:
        producer.flush()
producer.flush()
json.dump(sent, open(out, "w"))
"""


def examples(rows) -> str:
    return "".join("\t".join([r[0], "1", *r[1:]]) + "\n" for r in rows)


def trainer_cmd(bootstrap, topic, work: Path, model: str, sync: float, *extra) -> list[str]:
    return [
        sys.executable, "-m", "headrace.runners.cli", "train", "ctr", "--online",
        "--bootstrap", bootstrap, "--examples", topic, "--serving-dir", str(work / "serving"),
        "--output", str(work / "model"), "--mesh", "", "--model", model, "--capacity", str(1 << 18),
        "--batch-size", "256", "--sync-every", str(sync),
        "--dense-sync-every", str(2 * sync), "--idle-timeout", "20", "--checkpoint-every-seconds", "30",
        *extra,
    ]  # fmt: skip


def serving_times(work: Path, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For examples at these offsets (partition 0): when the first serving copy trained on each and on
    everything before it was published (the trainer's syncs.jsonl, `trained_below`), for those covered,
    and the mask of the covered ones."""
    syncs = [json.loads(line) for line in (work / "model" / "syncs.jsonl").read_text().splitlines()]
    covered = np.array([s["trained_below"][0] for s in syncs])
    published = np.array([s["unix"] for s in syncs])
    first = np.searchsorted(covered, offsets, side="right")  # first sync with trained_below > offset
    ok = first < len(syncs)
    return published[first[ok]], ok


def run(bootstrap, rows, work: Path, topic: str, rate: float, sync: float, model: str, *extra) -> dict:
    work.mkdir(parents=True)
    (work / "examples.txt").write_text(examples(rows))
    with open(work / "trainer.log", "w") as log:
        trainer = subprocess.Popen(
            trainer_cmd(bootstrap, topic, work, model, sync, *extra), stdout=subprocess.DEVNULL, stderr=log
        )
        time.sleep(8)  # the trainer starts (TensorFlow import, topic discovery) before the stream does
        subprocess.run(
            [sys.executable, "-c", _PRODUCE, bootstrap, topic, str(work / "examples.txt"), str(rate), str(work / "sent.json")],
            capture_output=True,
            check=True,
        )  # fmt: skip
        if trainer.wait(timeout=1800) != 0:
            raise RuntimeError((work / "trainer.log").read_text()[-3000:])
    sent = np.array(json.loads((work / "sent.json").read_text()))
    published, ok = serving_times(work, np.arange(len(sent)))
    if not ok.any():
        raise RuntimeError(f"no serving copy covers the stream ({len(sent)} sent)")
    latency = published - sent[ok]
    metrics = json.loads((work / "model" / "metrics.json").read_text())
    return {
        "examples": metrics["examples_trained"],
        "per_sec": metrics["examples_per_sec"],
        "p50": float(np.percentile(latency, 50)),
        "p95": float(np.percentile(latency, 95)),
        "serving": work / "serving",
    }


_READ_TOPIC = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
from headrace.runners.kafka import PartitionReader
reader = PartitionReader(sys.argv[1], sys.argv[2], 0)
print(json.dumps([[k.decode(), m.decode()] for k, m in reader.read_keyed(0, reader.end())]))
"""


def read_appended(bootstrap: str, topic: str) -> list[tuple[str, str, float]]:
    """Every message of partition 0 of `topic` as ``(key, value, seconds)``: the record's timestamp, the
    broker's append time for a topic created with ``message.timestamp.type=LogAppendTime``."""
    from confluent_kafka import Consumer, TopicPartition

    end = stack.end_offsets(bootstrap, [topic])[(topic, 0)]
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "bench-read", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    out = []
    try:
        while len(out) < end:
            for m in consumer.consume(10_000, timeout=5):
                if m.error() is None:
                    out.append((m.key().decode(), m.value().decode(), m.timestamp()[1] / 1000))
    finally:
        consumer.close()
    return out


def run_join(
    bootstrap,
    rows,
    work: Path,
    rate: float,
    sync: float,
    model: str,
    window: float,
    join_args=(),
    trainer_args=(),
) -> dict:
    """replay -> Kafka -> `stream ctr-join` on Flink -> Kafka -> `train ctr --online`: for every click
    that made a positive, the time from the click entering Kafka to the first serving copy trained on it."""
    from headrace.pipelines.ctr_stream import replay_events

    work.mkdir(parents=True)
    (work / "log.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    from confluent_kafka.admin import AdminClient, NewTopic

    topics = ["join-imps", "join-acts", "join-examples", "join-late", "join-rejected"]
    # The examples topic stamps each message with the broker's append time: the join's share of the
    # latency (click -> example in Kafka) apart from the trainer's (example in Kafka -> serving copy).
    admin = AdminClient({"bootstrap.servers": bootstrap})
    created = admin.create_topics(
        [NewTopic(topics[2], 1, 1, config={"message.timestamp.type": "LogAppendTime"})]
    )
    created[topics[2]].result(30)
    stack.create_topics(bootstrap, topics)
    cli = [sys.executable, "-m", "headrace.runners.cli"]
    join_log = open(work / "join.log", "w")  # noqa: SIM115 (the job outlives this block)
    join = subprocess.Popen(
        [*cli, "stream", "ctr-join", "--runner", "flink", "--bootstrap", bootstrap, "--impressions", topics[0],
         "--actions", topics[1], "--examples", topics[2], "--late", topics[3], "--rejected", topics[4],
         "--join-window", str(window), *join_args],
        stdout=join_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        # Ready when malformed probes come back on the rejected topic (the job reads and writes).
        probe = (
            "import sys; from headrace.runners.kafka import KafkaProducer; p = KafkaProducer(sys.argv[1]); "
        )
        probe += "[p.send(sys.argv[2], 'probe') for _ in (0, 1)]; p.flush()"
        subprocess.run([sys.executable, "-c", probe, bootstrap, topics[0]], check=True)
        deadline = time.monotonic() + 300
        while stack.end_offsets(bootstrap, [topics[4]])[(topics[4], 0)] < 2:
            if time.monotonic() > deadline:
                raise RuntimeError((work / "join.log").read_text()[-3000:])
            time.sleep(1)
        with open(work / "trainer.log", "w") as log:
            trainer = subprocess.Popen(
                trainer_cmd(bootstrap, topics[2], work, model, sync, "--idle-timeout", "60", *trainer_args),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            time.sleep(8)
            with open(work / "replay.log", "w") as replay_log:
                replay = subprocess.run(
                    [*cli, "stream", "replay", "--input", str(work / "log.tsv"), "--bootstrap", bootstrap,
                     "--impressions", topics[0], "--actions", topics[1], "--rate", str(rate), "--prefix", "j",
                     "--log-every-seconds", "2"],
                    stdout=subprocess.PIPE, stderr=replay_log, text=True, check=True,
                )  # fmt: skip
            sent = json.loads(replay.stdout.strip().splitlines()[-1])
            if trainer.wait(timeout=1800) != 0:
                raise RuntimeError((work / "trainer.log").read_text()[-3000:])
    finally:
        os.killpg(join.pid, 15)
        join.wait(60)
        join_log.close()
    events = replay_events(
        ["\t".join(r) for r in rows], start_ms=sent["start_ms"], rate=rate, mean_click_delay_s=5.0, prefix="j"
    )
    click_ms = {m.split("\t", 1)[0]: t for topic, t, m in events if topic == "actions"}
    examples = read_appended(bootstrap, topics[2])
    first: dict[str, int] = {}  # a positive's first message (the early one) per request id
    for k, (key, value, _) in enumerate(examples):
        rid = key.split("\t", 1)[0]
        if value.startswith("1\t") and rid not in first:
            first[rid] = k
    offsets = np.array(sorted(first.values()))
    clicked = np.array([click_ms[examples[k][0].split("\t", 1)[0]] / 1000 for k in offsets])
    appended = np.array([examples[k][2] for k in offsets])
    published, ok = serving_times(work, offsets)
    latency = published - clicked[ok]
    join_part, trainer_part = appended[ok] - clicked[ok], published - appended[ok]
    # Steady state: clicks after the first final decisions could have come (the first impression's window
    # and allowed lateness, 2 s, and 5 s to spare). Before that the trainer holds every early positive for
    # a join watermark it has not yet seen (the start-up transient).
    steady = clicked[ok] >= sent["start_ms"] / 1000 + window + 2 + 5
    syncs = [json.loads(line) for line in (work / "model" / "syncs.jsonl").read_text().splitlines()]
    behind = [s["unix"] - s["join_watermark_ms"] / 1000 for s in syncs if s.get("join_watermark_ms")]
    metrics = json.loads((work / "model" / "metrics.json").read_text())
    pct = lambda x, q: float(np.percentile(x, q)) if len(x) else float("nan")
    return {
        # the rate the replay was scheduled at: impressions at `rate`, their clicks in between
        "events_per_sec": (sent["impressions"] + sent["actions"]) / (sent["impressions"] / rate),
        "examples": len(examples),
        "positives": len(offsets),
        "p50": pct(latency, 50),
        "p95": pct(latency, 95),
        "steady": int(steady.sum()),
        "steady_p50": pct(latency[steady], 50),
        "steady_p95": pct(latency[steady], 95),
        "join_p50": pct(join_part[steady], 50),
        "join_p95": pct(join_part[steady], 95),
        "trainer_p50": pct(trainer_part[steady], 50),
        "trainer_p95": pct(trainer_part[steady], 95),
        "watermark_behind_p50": pct(behind, 50),
        "per_sec": metrics["examples_per_sec"],
        "serving": work / "serving",
    }


# Before the join was rewritten (commit 292a156: a stateful DoFn, one Kafka read over both topics), with the
# same backlog method on this machine: 27,041 events of a 20,000-line backlog at 208-210 events/s (the issue
# quotes about 220); a click reached a serving copy in 11-16 s (the figure, at 100 impressions/s).
BASELINE = {"join_events_per_s": 210.0, "p50": 11.0, "p95": 16.0}


def join_backlog(work: Path, lines: int) -> dict:
    """The join's sustained rate: `lines` of a generated log become a backlog of impressions and clicks
    (record timestamps = event times, an hour ago), then `stream ctr-join` starts on it; events/s from its
    first output to its last final decision, and its final decisions against a plain-Python reference."""
    from confluent_kafka import Producer

    from headrace.pipelines.ctr_stream import parse_example_key, replay_events

    work.mkdir(parents=True)
    broker = stack.start_kafka(workdir=work / "kafka")
    try:
        bootstrap = broker.bootstrap
        generate(work / "log.tsv", lines, seed=3)
        topics = ["bl-imps", "bl-acts", "bl-examples", "bl-late", "bl-rejected"]
        stack.create_topics(bootstrap, topics)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
        impressions, clicks = {}, {}
        start = int(time.time() * 1000) - 3_600_000
        log = (work / "log.tsv").read_text().splitlines()
        for topic, t, message in replay_events(log, start_ms=start, rate=1000, prefix="b"):
            producer.produce(
                topics[0] if topic == "impressions" else topics[1], message.encode(), timestamp=t
            )
            producer.poll(0)
            (impressions if topic == "impressions" else clicks)[message.split("\t", 1)[0]] = t
        producer.flush()
        positives = {r for r, t in clicks.items() if t - impressions[r] <= 60_000}
        events = len(impressions) + len(clicks)
        cli = [sys.executable, "-m", "headrace.runners.cli"]
        with open(work / "join.log", "w") as out:
            join = subprocess.Popen(
                [*cli, "stream", "ctr-join", "--runner", "flink", "--bootstrap", bootstrap,
                 "--impressions", topics[0], "--actions", topics[1], "--examples", topics[2],
                 "--late", topics[3], "--rejected", topics[4]],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        target = len(impressions) + len(positives)  # a final decision per impression, positives early too
        first = done = None
        samples = []  # (seconds, examples written)
        try:
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                written = stack.end_offsets(bootstrap, [topics[2]])[(topics[2], 0)]
                samples.append((time.monotonic(), written))
                if written and first is None:
                    first = time.monotonic()
                if written >= target:
                    done = time.monotonic()
                    break
                time.sleep(0.5)
        finally:
            os.killpg(join.pid, 15)
            join.wait(60)
        if done is None:
            raise RuntimeError((work / "join.log").read_text()[-3000:])
        out = subprocess.run(
            [sys.executable, "-c", _READ_TOPIC, bootstrap, topics[2]],
            capture_output=True,
            text=True,
            check=True,
        )
        final = {}
        for key, value in json.loads(out.stdout):
            rid, _, watermark = parse_example_key(key)
            if watermark:
                final[rid] = value[0]
        exact = {r for r, v in final.items() if v == "1"} == positives and len(final) == len(impressions)
        return {
            "events": events,
            "seconds": done - first,
            "per_sec": events / (done - first),
            "sustained_per_sec": _sustained(samples, target) * events / target,
            "exact": exact,
        }
    finally:
        stack.stop(broker)


def _sustained(samples: list[tuple[float, int]], target: int) -> float:
    """Examples/s between 20 % and 80 % of the output: past the JVM's warm-up (its JIT compiler takes half
    a core for the first minute) and before the burst of final decisions the last watermark releases."""
    lo = next(s for s in samples if s[1] >= 0.2 * target)
    hi = next(s for s in samples if s[1] >= 0.8 * target)
    return (hi[1] - lo[1]) / max(hi[0] - lo[0], 1e-9)


def _latency_parts(joined: dict) -> str:
    return (
        f"  (steady state, the {joined['steady']:,} clicks after the first decisions: p50 {joined['steady_p50']:.2f} s,"
        f" p95 {joined['steady_p95']:.2f} s; of which click -> example in Kafka, the join: p50"
        f" {joined['join_p50']:.2f} s, p95 {joined['join_p95']:.2f} s; example in Kafka -> serving copy, the"
        f" trainer: p50 {joined['trainer_p50']:.2f} s, p95 {joined['trainer_p95']:.2f} s. The join's watermark"
        f" as the trainer saw it, behind the clock at its syncs: p50 {joined['watermark_behind_p50']:.2f} s)"
    )


def print_production(backlog: dict, joined: dict, args) -> None:
    print(
        "\nstreaming at production rates (this machine: 2 cores, the join, Kafka and the trainer share them)"
    )
    print(f"{'figure':<52} {'before':>10} {'now':>10} {'ratio':>7}")
    rate = backlog["sustained_per_sec"]
    print(f"{'join events/s, sustained on a backlog':<52} {BASELINE['join_events_per_s']:>10,.0f} {rate:>10,.0f} "
          f"{rate / BASELINE['join_events_per_s']:>6.1f}x")  # fmt: skip
    print(f"  (between 20 % and 80 % of the output; {backlog['events']:,} events in {backlog['seconds']:.1f} s "
          f"from the first output to the last decision, {backlog['per_sec']:,.0f}/s with the JVM's warm-up; "
          f"final decisions equal the reference: {'yes' if backlog['exact'] else 'NO'})")  # fmt: skip
    for q in ("p50", "p95"):
        print(f"{'click -> serving copy ' + q + ' s at ' + format(args.join_rate, '.0f') + ' impressions/s':<52} "
              f"{BASELINE[q]:>10.1f} {joined[q]:>10.2f} {joined[q] / BASELINE[q]:>6.2f}x")  # fmt: skip
    print(_latency_parts(joined))
    print("\n`headrace serve ctr` under load while a new version is swapped in (bench/serve.py):")
    subprocess.run([sys.executable, str(Path(__file__).with_name("serve.py")), "--seconds", "5"], check=True)


def serving_auc(serving: Path, held_out) -> float:
    from headrace.models.criteo import FIELDS
    from headrace.runners.serving import ServingCopy

    copy = ServingCopy(serving)
    copy.refresh()
    fields = {name: np.array([r[1 + k] for r in held_out]) for k, name in enumerate(FIELDS)}
    y = np.array([float(r[0]) for r in held_out])
    return metrics_lib.auc(y, copy.probability(fields))


def print_join(args, joined: dict, held_out) -> None:
    print(
        f"\nthrough the Flink join: {args.join_lines:,} lines at {args.join_rate:.0f} impressions/s, "
        f"window {args.join_window:g}s, sync every 1s; latency = click in Kafka -> serving copy"
    )
    print(f"{'run':<36} {'events/s':>11} {'p50 s':>7} {'p95 s':>7}")
    print(
        f"{'replay -> join -> online trainer':<36} {joined['events_per_sec']:>11,.0f} "
        f"{joined['p50']:>7.2f} {joined['p95']:>7.2f}"
    )
    print(_latency_parts(joined))
    print(
        f"  ({joined['positives']:,} positives of {joined['examples']:,} examples; "
        f"held-out AUC of its serving copy {serving_auc(joined['serving'], held_out):.4f})"
    )


def _scratch(keep: str):
    """A temporary directory, or `keep` (made fresh, left in place) when given."""
    if not keep:
        return tempfile.TemporaryDirectory()
    Path(keep).mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext(tempfile.mkdtemp(dir=keep))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=40000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--syncs", default="1,5")
    parser.add_argument("--model", default="fm")
    parser.add_argument("--join-lines", type=int, default=4000, help="lines replayed through the Flink join")
    parser.add_argument("--join-rate", type=float, default=100.0, help="impressions/s into the join")
    parser.add_argument("--join-window", type=float, default=10.0)
    parser.add_argument("--join-only", action="store_true", help="only the run through the Flink join")
    parser.add_argument(
        "--production", action="store_true",
        help="only the production-rate table: join events/s on a backlog, click -> serving at --join-rate, server",
    )  # fmt: skip
    parser.add_argument("--backlog-lines", type=int, default=300_000, help="lines of the join's backlog")
    parser.add_argument(
        "--trainer-args", default="--shuffle-buffer 0 --max-wait 0.2",
        help="flags of the online trainer behind the join (default: for freshness, no shuffle buffer)",
    )  # fmt: skip
    parser.add_argument("--join-args", default="", help="flags of `stream ctr-join`, e.g. '--bundle-time 1'")
    parser.add_argument(
        "--workdir", default="", help="keep the runs' logs and outputs here (default: a temp dir)"
    )
    args = parser.parse_args()
    args.join_args, args.trainer_args = shlex.split(args.join_args), shlex.split(args.trainer_args)
    if args.production:
        with _scratch(args.workdir) as tmp:
            backlog = join_backlog(Path(tmp) / "backlog", args.backlog_lines)
            broker = stack.start_kafka(workdir=Path(tmp) / "kafka")
            try:
                generate(Path(tmp) / "log.tsv", args.join_lines, seed=5)
                rows = [r.split("\t") for r in (Path(tmp) / "log.tsv").read_text().splitlines()]
                rows = [r for r in rows if len(r) == 40 and r[0] in ("0", "1")]
                joined = run_join(
                    broker.bootstrap,
                    rows,
                    Path(tmp) / "join",
                    args.join_rate,
                    1.0,
                    args.model,
                    args.join_window,
                    args.join_args,
                    args.trainer_args,
                )
            finally:
                stack.stop(broker)
        print_production(backlog, joined, args)
        return
    with _scratch(args.workdir) as tmp:
        tmp = Path(tmp)
        broker = stack.start_kafka(workdir=tmp / "kafka")
        try:
            generate(tmp / "log.tsv", args.lines + args.lines // 8, seed=5)
            rows = [r.split("\t") for r in (tmp / "log.tsv").read_text().splitlines()]
            rows = [r for r in rows if len(r) == 40 and r[0] in ("0", "1")]
            stream, held_out = rows[: args.lines], rows[args.lines :]
            results = []
            if args.join_only:
                joined = run_join(
                    broker.bootstrap, stream[: args.join_lines], tmp / "join", args.join_rate, 1.0, args.model,
                    args.join_window, args.join_args, args.trainer_args,
                )  # fmt: skip
                print_join(args, joined, held_out)
                return
            runs = [(float(s), ()) for s in args.syncs.split(",")]
            runs.insert(1, (runs[0][0], ("--shuffle-buffer", "0", "--max-wait", "0.2")))
            for k, (sync, extra) in enumerate(runs):
                r = run(
                    broker.bootstrap,
                    stream,
                    tmp / f"run{k}",
                    f"bench-{k}",
                    args.rate,
                    sync,
                    args.model,
                    *extra,
                )
                shuffle = "no shuffle" if extra else "shuffle 4096"
                results.append((f"online, {args.rate:.0f}/s, sync {sync:g}s, {shuffle}", r))
            joined = run_join(
                broker.bootstrap,
                stream[: args.join_lines],
                tmp / "join",
                args.join_rate,
                1.0,
                args.model,
                args.join_window,
                args.join_args,
                args.trainer_args,
            )
            burst = run(broker.bootstrap, stream, tmp / "burst", "bench-burst", 0, 5.0, args.model)
            first = stream[: args.lines // 10]  # one pass, fully shuffled: a batch model
            batch = run(
                broker.bootstrap, first, tmp / "batch", "bench-batch", 0, 5.0, args.model,
                "--shuffle-buffer", str(len(first)), "--max-wait", "60",
            )  # fmt: skip
            print(
                f"\n{len(stream):,} examples ({args.model}), held-out {len(held_out):,}; "
                "latency = sent -> first serving copy trained on it and on everything before it"
            )
            print(f"{'run':<48} {'examples/s':>11} {'p50 s':>7} {'p95 s':>7}")
            for name, r in results:
                print(f"{name:<48} {r['per_sec']:>11,.0f} {r['p50']:>7.2f} {r['p95']:>7.2f}")
            print(f"{'online, all at once (sustained)':<48} {burst['per_sec']:>11,.0f} {'-':>7} {'-':>7}")
            print_join(args, joined, held_out)
            auc_online = serving_auc(results[0][1]["serving"], held_out)
            auc_batch = serving_auc(batch["serving"], held_out)
            print(f"\n{'held-out AUC':<36} {'online':>11} {'batch':>7} {'diff':>7}")
            print(
                f"{'serving copy vs first 10% only':<36} {auc_online:>11.4f} {auc_batch:>7.4f} {auc_online - auc_batch:>+7.4f}"
            )
        finally:
            stack.stop(broker)


if __name__ == "__main__":
    main()
