"""Benchmark: the online trainer on a real Kafka broker: sustained examples/s, freshness, AUC vs batch.

    python bench/streaming.py [--lines 40000] [--rate 2000] [--syncs 1,5] [--model fm]

A producer sends joined examples (label, weight, 39 raw fields: what `stream ctr-join` writes) to a topic
at --rate per second and records when each was sent; `headrace train ctr --online` trains from the topic
and publishes serving copies every --sync-every seconds (dense weights every 2x that). For every example,
the latency is the time from its send to the publication of the first serving copy trained on it (from
the trainer's syncs.jsonl), reported as p50 / p95. A last run sends everything at once to measure what
the trainer sustains (examples/s between its first and last step, syncs included). The AUC rows compare, on held-out later examples, the final serving copy with a
batch model trained once on the first 10% of the stream (Monolith's online-vs-batch comparison).

Not measured yet: the joiner's share of the latency (issue 8: `stream ctr-join` on Flink is not reliable
here, see the README), so this is example-in-Kafka to serving, not action-in-Kafka to serving.
"""

from __future__ import annotations

import argparse
import json
import os
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
from headrace.runners.stream import KafkaProducer
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
        "--batch-size", "256", "--flush-after", "0.2", "--sync-every", str(sync),
        "--dense-sync-every", str(2 * sync), "--idle-timeout", "20", "--checkpoint-every-seconds", "30",
        *extra,
    ]  # fmt: skip


def run(bootstrap, rows, work: Path, topic: str, rate: float, sync: float, model: str) -> dict:
    work.mkdir(parents=True)
    (work / "examples.txt").write_text(examples(rows))
    with open(work / "trainer.log", "w") as log:
        trainer = subprocess.Popen(
            trainer_cmd(bootstrap, topic, work, model, sync), stdout=subprocess.DEVNULL, stderr=log
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
    syncs = [json.loads(line) for line in (work / "model" / "syncs.jsonl").read_text().splitlines()]
    covered = np.array([s["offsets"][0] for s in syncs])
    published = np.array([s["unix"] for s in syncs])
    first = np.searchsorted(covered, np.arange(len(sent)), side="right")  # first sync covering offset k
    ok = first < len(syncs)
    if not ok.any():
        raise RuntimeError(f"no serving copy covers the stream: syncs {syncs[-3:]}, sent {len(sent)}")
    latency = published[first[ok]] - sent[ok]
    metrics = json.loads((work / "model" / "metrics.json").read_text())
    return {
        "examples": metrics["examples_trained"],
        "per_sec": metrics["examples_per_sec"],
        "p50": float(np.percentile(latency, 50)),
        "p95": float(np.percentile(latency, 95)),
        "serving": work / "serving",
    }


def serving_auc(serving: Path, held_out) -> float:
    from headrace.runners.train_ctr import FIELDS
    from headrace.runners.train_ctr_online import ServingCopy

    copy = ServingCopy(serving)
    copy.refresh()
    fields = {name: np.array([r[1 + k] for r in held_out]) for k, name in enumerate(FIELDS)}
    y = np.array([float(r[0]) for r in held_out])
    return metrics_lib.auc(y, copy.probability(fields))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=40000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--syncs", default="1,5")
    parser.add_argument("--model", default="fm")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        broker = stack.start_kafka(workdir=tmp / "kafka")
        try:
            generate(tmp / "log.tsv", args.lines + args.lines // 8, seed=5)
            rows = [r.split("\t") for r in (tmp / "log.tsv").read_text().splitlines()]
            rows = [r for r in rows if len(r) == 40 and r[0] in ("0", "1")]
            stream, held_out = rows[: args.lines], rows[args.lines :]
            results = []
            for sync in [float(s) for s in args.syncs.split(",")]:
                r = run(
                    broker.bootstrap,
                    stream,
                    tmp / f"sync{sync}",
                    f"bench-{sync}",
                    args.rate,
                    sync,
                    args.model,
                )
                results.append((f"online, {args.rate:.0f}/s, sync every {sync:g}s", r))
            burst = run(broker.bootstrap, stream, tmp / "burst", "bench-burst", 0, 5.0, args.model)
            batch = run(
                broker.bootstrap, stream[: args.lines // 10], tmp / "batch", "bench-batch", 0, 5.0, args.model
            )
            print(
                f"\n{len(stream):,} examples ({args.model}), held-out {len(held_out):,}; latency = sent -> serving"
            )
            print(f"{'run':<36} {'examples/s':>11} {'p50 s':>7} {'p95 s':>7}")
            for name, r in results:
                print(f"{name:<36} {r['per_sec']:>11,.0f} {r['p50']:>7.2f} {r['p95']:>7.2f}")
            print(f"{'online, all at once (sustained)':<36} {burst['per_sec']:>11,.0f} {'-':>7} {'-':>7}")
            auc_online = serving_auc(results[-1][1]["serving"], held_out)
            auc_batch = serving_auc(batch["serving"], held_out)
            print(f"\n{'held-out AUC':<36} {'online':>11} {'batch':>7} {'diff':>7}")
            print(
                f"{'serving copy vs first 10% only':<36} {auc_online:>11.4f} {auc_batch:>7.4f} {auc_online - auc_batch:>+7.4f}"
            )
        finally:
            stack.stop(broker)


if __name__ == "__main__":
    main()
