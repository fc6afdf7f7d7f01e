"""``headrace stream``: the streaming CTR path's long-running processes.

    headrace stream replay --input CRITEO_TSV --bootstrap HOST:PORT [--rate N] [--mean-click-delay S]
    headrace stream ctr-join --bootstrap HOST:PORT --impressions T --actions T --examples T
        [--join-window S] [--negative-keep-rate R] [--runner FlinkRunner] [beam options]

`replay` is a producer: each line of a Criteo log becomes an impression at its scheduled time (``rate``
per second from now) and, for a clicked line, a click an exponential delay later, both sent when their
time comes, so that the Kafka record's CreateTime, the event time in the message and the wall clock
agree. `ctr-join` runs until stopped (Ctrl-C or SIGTERM cancels the job). The online trainer is
``headrace train ctr --online`` (`headrace.runners.train_ctr_online`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
import tempfile
import time
from pathlib import Path

from headrace.core.errors import InputError
from headrace.pipelines.ctr_stream import CtrJoinConfig, ReplayConfig, build_ctr_join, replay_events

__all__ = ["ctr_join", "replay"]

_log = logging.getLogger("headrace.stream")


def replay(config: ReplayConfig) -> dict:
    """Sends the log's events on schedule (``rate`` impressions per second from now; 20,000/s and more is
    faster than real time, what the join's rate is measured with); returns counts. Blocks until the last
    click is sent. Each record's timestamp (the CreateTime the join reads as event time) is the event
    time in its message, also when the producer falls behind schedule."""
    from confluent_kafka import KafkaException, Producer

    path = Path(config.input)
    if not config.input or not path.is_file():
        raise InputError(f"--input {config.input!r}: no such file (a Criteo-format TSV log)")
    if config.rate <= 0:
        raise InputError(f"--rate {config.rate}: must be > 0 impressions per second")
    errors: list[str] = []

    def delivered(err, msg):
        if err is not None:
            errors.append(f"{msg.topic()}: {err}")

    producer = Producer(
        {"bootstrap.servers": config.bootstrap, "linger.ms": 5, "queue.buffering.max.messages": 1_000_000}
    )
    topics = {"impressions": config.impressions, "actions": config.actions}
    counts = {"impressions": 0, "actions": 0}
    start_ms = int(time.time() * 1000) + 500
    last_log = time.monotonic()
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = itertools.islice(f, config.limit or None)
        events = replay_events(
            lines,
            start_ms=start_ms,
            rate=config.rate,
            mean_click_delay_s=config.mean_click_delay,
            seed=config.seed,
            prefix=config.prefix,
        )
        for kind, t_ms, message in events:
            wait = t_ms / 1000 - time.time()
            if wait > 0.002:  # sleeps of a few ms at most between batches: 20,000/s stays on schedule
                time.sleep(wait)
            while True:
                try:
                    producer.produce(topics[kind], message.encode(), timestamp=t_ms, on_delivery=delivered)
                    break
                except BufferError:  # the local queue is full: let librdkafka send
                    producer.poll(0.05)
            counts[kind] += 1
            if (counts["impressions"] + counts["actions"]) % 1024 == 0:  # delivery reports
                producer.poll(0)
            if time.monotonic() - last_log > config.log_every_seconds:
                last_log = time.monotonic()
                behind = time.time() - t_ms / 1000
                _log.info("replay: %s sent (%.1fs behind schedule)", counts, max(behind, 0.0))
    if producer.flush(60) or errors:
        raise KafkaException(f"replay: {len(errors)} event(s) not delivered: {errors[:3]}")
    seconds = time.time() - start_ms / 1000
    result = {**counts, "seconds": round(seconds, 2), "start_ms": start_ms}
    _log.info("replay: done, %s", result)
    return result


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest completed Flink checkpoint under `directory` (``JOB/chk-N`` with its ``_metadata``)."""
    done = sorted(directory.glob("*/chk-*/_metadata"), key=lambda p: p.stat().st_mtime)
    return done[-1].parent if done else None


def checkpoint_args(config: CtrJoinConfig, beam_args, scratch: str) -> list[str]:
    """Flink flags for the join's checkpoints: every `checkpoint_interval` seconds, on the filesystem; in
    `checkpoint_dir`, kept when the job ends and the newest one restored on start (without one, in
    `scratch`, a directory that goes with the run)."""
    if config.checkpoint_interval <= 0:
        return []
    args = []
    if not any(a.startswith("--checkpointing_interval") for a in beam_args):
        args.append(f"--checkpointing_interval={round(config.checkpoint_interval * 1000)}")
    # On the filesystem, never in the JobManager's memory: the join's state passes its 5 MB limit within
    # seconds on a backlog, the checkpoint fails, and the job restarts (replaying events).
    directory = Path(config.checkpoint_dir or scratch).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    args += [
        "--state_backend=filesystem",
        f"--state_backend_storage_path={directory.as_uri()}",
        "--retain_externalized_checkpoints_on_cancellation",
        # Each bundle is finished before the barrier. Otherwise the output of a bundle in flight is
        # buffered into the checkpoint, and a restored job replays it with the wrong output's coder: the
        # read stage's session-windowed events were written with the rejected output's GlobalWindow coder
        # ("Couldn't flush pushed back elements": ClassCastException IntervalWindow -> GlobalWindow), and
        # the restored job failed and restarted until it gave up.
        "--finish_bundle_before_checkpointing",
    ]
    latest = latest_checkpoint(directory) if config.checkpoint_dir else None
    if latest is not None and not any(a.startswith("--savepoint_path") for a in beam_args):
        _log.info("ctr-join: resuming from checkpoint %s", latest)
        # Beam applies --savepoint_path only for a remote Flink master; the embedded cluster of the
        # job server ([local]) reads the restore path from the Flink configuration it is given.
        conf = Path(scratch) / "flink-conf"
        conf.mkdir(exist_ok=True)
        for name in ("config.yaml", "flink-conf.yaml"):
            (conf / name).write_text(f"execution.savepoint.path: {latest.as_uri()}\n")
        args += [f"--savepoint_path={latest.as_uri()}", f"--flink_conf_dir={conf}"]
    return args


def bundle_args(config: CtrJoinConfig) -> list[str]:
    """The Flink flag that closes a bundle after `bundle_time` seconds (Flink's default is 1 s, and a click
    waits in every stage's open bundle). The job server declares the option; Python's options do not."""
    if config.bundle_time <= 0:
        return []
    return [f"--max_bundle_time_mills={max(1, round(config.bundle_time * 1000))}"]


def ctr_join(config: CtrJoinConfig, runner: str | None, beam_args) -> int:
    """Submits the join and waits; Ctrl-C / SIGTERM cancel the job."""
    from headrace.runners import stack
    from headrace.runners.beam_runner import create_pipeline, flink_master_of, resolve_runner

    runner = runner or "FlinkRunner"
    beam_args = list(beam_args)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    topics = [config.impressions, config.actions, config.examples, config.late, config.rejected]
    created = stack.create_topics(config.bootstrap, topics, config.partitions)
    if created:
        _log.info("ctr-join: created topics %s (%d partitions each)", created, config.partitions)
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with contextlib.ExitStack() as services:
            scratch = services.enter_context(tempfile.TemporaryDirectory(prefix="headrace-ctr-join-"))
            beam_args += checkpoint_args(config, beam_args, scratch) + bundle_args(config)
            address = services.enter_context(stack.expansion_service(experiments=["use_deprecated_read"]))
            if resolve_runner(runner) == "FlinkRunner" and not any(
                a.startswith("--job_endpoint") for a in beam_args
            ):
                # A job server of its own, submitting to --flink_master (a standalone cluster: `stack up
                # --flink`) or, without one, to the embedded cluster inside it.
                server = stack.flink_job_server(flink_master_of(beam_args))
                beam_args.append(f"--job_endpoint={services.enter_context(server)}")
            pipeline = create_pipeline(runner, beam_args, streaming=True, job_name="headrace-ctr-join")
            build_ctr_join(pipeline, config, address)
            result = pipeline.run()
            _log.info(
                "ctr-join running on %s: %s + %s -> %s (late: %s, rejected: %s)",
                resolve_runner(runner),
                config.impressions,
                config.actions,
                config.examples,
                config.late,
                config.rejected,
            )
            try:
                result.wait_until_finish()
            except KeyboardInterrupt:
                _log.info("ctr-join: stopping")
                with contextlib.suppress(Exception):
                    result.cancel()
                return 130
            return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
