"""The ``headrace`` command.

    headrace run PIPELINE [flags] [--runner R] [--config NAME] [--set KEY=VALUE ...] [beam options]
    headrace train MODEL [flags] [--mesh batch=4,model=2] [--config NAME] [--set KEY=VALUE ...]
    headrace configs list | show NAME
    headrace demo [--workdir DIR]
    headrace jars fetch | path

A command's flags are its config's top-level fields (``--eval-fraction`` sets ``eval_fraction``); nested
fields are set with ``--set model.hidden=64``. Resolution order: the registered config (``--config`` or the
command's default), then flags, then ``--set`` in order. ``run`` passes flags it does not know to Beam,
after checking that Beam knows them. Mistakes print one line and exit 2; errors in inputs print one line
and exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import re
import sys
import typing
import warnings
from collections.abc import Sequence

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError, HeadraceError, user_error_in
from headrace.runners import commands

__all__ = ["main"]


_NUMBER = r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one line (no usage dump) raised as ConfigError.

    Negative numbers and comma-separated lists of numbers (``--hu-window -1000,400``) are values, not
    flags: argparse's own matcher accepts a single negative number only.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(rf"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?:,{_NUMBER})*$")

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


def _quiet_environment() -> None:
    # TF 2.17 logs CUDA plugin registration "errors" on every import on machines without CUDA; they are
    # noise. TF_CPP_MIN_LOG_LEVEL=0 brings every C++ log back for debugging.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


class _UserErrorsOnce(logging.Filter):
    """Drops log records carrying a HeadraceError: Beam logs an exception raised in a DoFn with its whole
    traceback before re-raising it, and the CLI prints the error as one line anyway (`--verbose` keeps
    the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HeadraceError):
            return False
        return not (record.levelno >= logging.ERROR and user_error_in(record.getMessage()))


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,  # importing a command's module may have installed a handler already
    )
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_UserErrorsOnce())
    if not verbose:
        for noisy in ("apache_beam", "absl", "tensorflow", "root", "h5py", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("headrace").setLevel(logging.DEBUG if verbose else logging.INFO)
    # Beam warns that python-snappy's crc32c is missing; crcmod's C extension, which it falls back to,
    # takes 0.8 us per 200-byte record here, far below the cost of building the example.
    logging.getLogger("apache_beam.io.tfrecordio").setLevel(logging.ERROR)


# -------------------------------------------------------------------------------------------------
# Config flags
# -------------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser, config) -> list[str]:
    """One flag per top-level scalar field of `config`; returns the field names."""
    hints = typing.get_type_hints(type(config))
    names = []
    group = parser.add_argument_group("config fields (see `headrace configs show NAME`)")
    for field in dataclasses.fields(config):
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            continue
        default = getattr(config, field.name)
        required = " (required)" if field.metadata.get("required") else f" (default: {default!r})"
        help_text = field.metadata.get("help", "") + required
        if tp is bool:
            group.add_argument(
                _flag(field.name),
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            group.add_argument(
                _flag(field.name),
                dest=field.name,
                default=argparse.SUPPRESS,
                metavar=field.name.upper(),
                help=help_text,
            )
        names.append(field.name)
    return names


def _resolve_config(command: commands.Command, argv: Sequence[str], *, allow_unknown: bool):
    """Parses a command's flags; returns (config, parsed args, unknown args)."""
    command.load()  # registers the command's configs
    pre = _Parser(add_help=False)
    pre.add_argument("--config", default=command.default_config)
    known, _ = pre.parse_known_args(argv)
    try:
        registered = config_lib.lookup(known.config)
    except ConfigError:  # perhaps another command's config: load them all to say which
        commands.load_all()
        registered = config_lib.lookup(known.config)
    if registered.command != command.key:
        raise ConfigError(f"--config {known.config!r} is for `{registered.command}`, not `{command.key}`")
    base = config_lib.get(known.config)

    parser = _Parser(prog=f"headrace {command.key}", description=command.summary)
    parser.add_argument("--config", default=command.default_config, help="registered config to start from")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a (nested) field"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    if command.verb == "stream" and command.name == "ctr-join":
        parser.add_argument(
            "--runner", default="FlinkRunner", help="a streaming runner (default FlinkRunner)"
        )
    if command.verb == "retrain":
        parser.add_argument("--runner", default=None, help="Beam runner of the ingest (default FnApiRunner)")
        parser.add_argument(
            "--dry-run", action="store_true", help="check the flags and inputs, change nothing"
        )
    if command.verb == "run":
        parser.add_argument(
            "--runner", default=None, help="FnApiRunner (default), FlinkRunner, DataflowRunner, ..."
        )
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="build and validate the pipeline without running it",
        )
        parser.add_argument(
            "--detach",
            action="store_true",
            help="submit to Dataflow and return (a Flex Template's launcher); outputs are written in place",
        )
    fields = _add_config_flags(parser, base)
    if allow_unknown:
        args, unknown = parser.parse_known_args(argv)
    else:
        args, unknown = parser.parse_args(argv), []

    config = base
    for name in fields:
        if hasattr(args, name):
            value = getattr(args, name)
            config = config_lib.override(
                config, name, value if isinstance(value, bool) else str(value), label=_flag(name)
            )
    config = config_lib.apply_overrides(config, args.set)
    return config, args, unknown


def _check_beam_args(beam_args: Sequence[str], command_key: str) -> None:
    """Refuses flags that neither the command nor Beam knows (typos would otherwise be ignored)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    parser = argparse.ArgumentParser(add_help=False)
    seen, stack = set(), [PipelineOptions]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
    for cls in [PipelineOptions, *seen]:
        with contextlib.suppress(argparse.ArgumentError):  # options declared by two classes
            cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(list(beam_args))
    flags = [u for u in unknown if u.startswith("-")]
    if flags or unknown:
        bad = (flags or unknown)[0]
        raise ConfigError(f"unknown flag {bad!r}: not a flag of `headrace {command_key}` nor a Beam option")


# -------------------------------------------------------------------------------------------------
# Verbs
# -------------------------------------------------------------------------------------------------


def _run(name: str, argv: Sequence[str]) -> int:
    if name not in commands.PIPELINES:
        raise ConfigError(f"unknown pipeline {name!r} (pipelines: {', '.join(sorted(commands.PIPELINES))})")
    command = commands.PIPELINES[name]
    config, args, beam_args = _resolve_config(command, argv, allow_unknown=True)
    _setup_logging(args.verbose)
    _check_beam_args(beam_args, command.key)
    from headrace.runners import beam_runner

    build = command.load()
    if args.dry_run:
        pipeline = beam_runner.create_pipeline(args.runner, beam_args, dry_run=True)
        build(pipeline, dataclasses.replace(config, output=config.output or "/tmp/headrace-dry-run"))
        if beam_runner.resolve_runner(args.runner) == "DataflowRunner":
            pipeline.run()  # DataflowRunner's dry_run builds and validates the job without submitting
        else:
            pipeline.to_runner_api()
        print(f"{command.key}: pipeline built and validated for {beam_runner.resolve_runner(args.runner)}")
        return 0
    if args.detach:
        job = beam_runner.submit_pipeline(
            build,
            config,
            runner=args.runner,
            beam_args=beam_args,
            overwrite=args.overwrite,
            job_name=f"headrace-{name}",
        )
        print(f"{command.key}: submitted {job} writing {config.output} (report.json once the job is done)")
        return 0
    result = beam_runner.run_pipeline(
        build,
        config,
        runner=args.runner,
        beam_args=beam_args,
        overwrite=args.overwrite,
        job_name=f"headrace-{name}",
    )
    print(f"{command.key}: wrote {result.output} on {result.runner} in {result.seconds:.1f}s")
    report = result.output / "report.json"
    if report.exists():
        print(report.read_text().strip())
    return 0


def _train(name: str, argv: Sequence[str], table=commands.TRAINERS) -> int:
    if name not in table:
        raise ConfigError(f"unknown model {name!r} (models: {', '.join(sorted(table))})")
    command = table[name]
    # Virtual CPU devices must exist before TensorFlow starts: parse the mesh first.
    config, args, _ = _resolve_config(command, argv, allow_unknown=False)
    _setup_logging(args.verbose)
    mesh_spec = getattr(config, "mesh", None)
    n = 0
    from headrace.core import cluster
    from headrace.core import mesh as mesh_lib

    clients = cluster.Clients.of(
        getattr(config, "num_clients", 1), getattr(config, "client_id", 0), getattr(config, "jobs", "")
    )
    clients.export()  # DTensor reads its multi-client set-up from the environment
    if mesh_spec:
        n = clients.local_devices(math.prod(size for _, size in mesh_lib.parse_mesh(mesh_spec)))
    if hasattr(config, "partitions"):  # spatially partitioned models: one device per block, plus the host
        if clients.multi:
            raise ConfigError(
                f"{name} partitions space over the devices of one client; --num-clients > 1 needs a batch mesh"
            )
        n = max(n, config.partitions) + 1
    if n:
        mesh_lib.configure_virtual_devices(n)
    if clients.multi:  # before TensorFlow initialises: DTensor's multi-client runtime replaces the local one
        if not n:
            raise ConfigError("--num-clients > 1 needs a mesh (--mesh) to share")
        cluster.initialize(mesh_lib.default_device_type(n))
    if command.verb != "generate" and not getattr(config, "output", "x"):  # a generator's is optional
        raise ConfigError("--output is required")
    try:
        result = command.load()(config)
    finally:
        cluster.shutdown()
    if isinstance(result, dict):
        import json

        print(json.dumps(result, indent=2, default=str))
    return 0


def _stream(name: str, argv: Sequence[str]) -> int:
    if name not in commands.STREAMS:
        raise ConfigError(
            f"unknown stream command {name!r} (commands: {', '.join(sorted(commands.STREAMS))})"
        )
    command = commands.STREAMS[name]
    join = name == "ctr-join"
    config, args, beam_args = _resolve_config(command, argv, allow_unknown=join)
    _setup_logging(args.verbose)
    if join:
        _check_beam_args(beam_args, command.key)
        return command.load()(config, args.runner, beam_args)
    import json

    print(json.dumps(command.load()(config)))
    return 0


def _serve(name: str, argv: Sequence[str]) -> int:
    if name not in commands.SERVERS:
        raise ConfigError(f"unknown server {name!r} (servers: {', '.join(sorted(commands.SERVERS))})")
    command = commands.SERVERS[name]
    config, args, _ = _resolve_config(command, argv, allow_unknown=False)
    _setup_logging(args.verbose)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    import signal

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        host_given = any(a == "--host" or a.startswith("--host=") for a in argv)
        return command.load()(config, host_given=host_given)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _retrain(name: str, argv: Sequence[str]) -> int:
    if name not in commands.RETRAINERS:
        raise ConfigError(f"unknown retrain {name!r} (retrain: {', '.join(sorted(commands.RETRAINERS))})")
    command = commands.RETRAINERS[name]
    config, args, beam_args = _resolve_config(command, argv, allow_unknown=True)
    _setup_logging(args.verbose)
    _check_beam_args(beam_args, command.key)
    train = getattr(config, "train", None)
    if getattr(train, "mesh", ""):
        from headrace.core import mesh as mesh_lib

        mesh_lib.configure_virtual_devices(math.prod(size for _, size in mesh_lib.parse_mesh(train.mesh)))
    import json

    result = command.load()(config, args.runner, beam_args, dry_run=args.dry_run)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _configs(argv: Sequence[str]) -> int:
    parser = _Parser(prog="headrace configs")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="registered configs")
    show = sub.add_parser("show", help="one config with all its fields, as JSON")
    show.add_argument("name")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    commands.load_all()
    if args.action == "list":
        rows = config_lib.registered()
        width = max(len(r.name) for r in rows)
        cwidth = max(len(r.command) for r in rows)
        for r in rows:
            print(f"{r.name:<{width}}  {r.command:<{cwidth}}  {r.description}")
        return 0
    config = config_lib.apply_overrides(config_lib.get(args.name), args.set)
    print(config_lib.dumps(config).rstrip())
    return 0


def _jars(argv: Sequence[str]) -> int:
    parser = _Parser(prog="headrace jars")
    sub = parser.add_subparsers(dest="action", required=True)
    fetch = sub.add_parser("fetch", help="build the Java jars from Maven Central into the cache (once)")
    fetch.add_argument("--force", action="store_true")
    sub.add_parser("path", help="where the jars are cached")
    args = parser.parse_args(argv)
    _setup_logging(False)
    from headrace.runners import jars

    if args.action == "fetch":
        for path in jars.fetch(force=args.force):
            print(path)
    else:
        for jar in jars.JARS.values():
            print(f"{jar.name}: {jar.path} ({'present' if jar.path.is_file() else 'missing'})")
    return 0


def _stack(argv: Sequence[str]) -> int:
    parser = _Parser(prog="headrace stack", description="the local stack (Kafka broker, Flink cluster)")
    sub = parser.add_subparsers(dest="action", required=True)
    start = sub.add_parser("up", help="start a Kafka broker on loopback (KRaft mode), or --flink a cluster")
    start.add_argument("--kafka-port", type=int, default=9092)
    start.add_argument(
        "--flink",
        action="store_true",
        help="a standalone Flink session cluster (JobManager, TaskManagers) instead",
    )
    start.add_argument("--taskmanagers", type=int, default=2, help="with --flink: TaskManager processes")
    start.add_argument("--slots", type=int, default=2, help="with --flink: task slots per TaskManager")
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="is it running, where")
    args = parser.parse_args(argv)
    _setup_logging(False)
    from headrace.runners import flink_cluster, stack

    if args.action == "up":
        if args.flink:
            print(flink_cluster.describe(flink_cluster.up(args.taskmanagers, args.slots)))
            return 0
        broker = stack.up(args.kafka_port)
        print(f"kafka: {broker.bootstrap} (pid {broker.pid}, log {broker.log})")
    elif args.action == "down":
        print("kafka: stopped" if stack.down() else "kafka: not running")
        print("flink: stopped" if flink_cluster.down() else "flink: not running")
    else:
        broker = stack.status()
        print(
            f"kafka: {broker.bootstrap} (pid {broker.pid}, log {broker.log})"
            if broker
            else "kafka: not running"
        )
        cluster = flink_cluster.status()
        print(flink_cluster.describe(cluster) if cluster else "flink: not running")
    return 0


def _demo(argv: Sequence[str]) -> int:
    parser = _Parser(prog="headrace demo", description="the main job on embedded defaults")
    parser.add_argument(
        "--workdir", default="headrace-demo", help="where the demo writes (replaced if the demo made it)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --workdir even if the demo did not make it"
    )
    parser.add_argument("--small", action="store_true", help="the same stages on a fraction of the data")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from headrace.runners import demo

    return demo.run_demo(args.workdir, demo.SMALL if args.small else demo.FULL, overwrite=args.overwrite)


def _usage() -> str:
    lines = [
        "usage: headrace {run,train,launch,predict,generate,export,stream,serve,retrain,schedule,templates,configs,demo,jars,"
        "stack} ...",
        "",
        "headrace: Beam pipelines that turn raw data into sharded tf.data input, and DTensor trainers.",
        "",
        "  run PIPELINE     run a Beam pipeline: " + ", ".join(sorted(commands.PIPELINES)),
        "  train MODEL      train a model on a DTensor mesh: " + ", ".join(sorted(commands.TRAINERS)),
        "  predict MODEL    run a trained model over a pipeline's output: "
        + ", ".join(sorted(commands.PREDICTORS)),
        "  generate MODEL   generate from a trained model: " + ", ".join(sorted(commands.GENERATORS)),
        "  stream NAME      streaming CTR: " + ", ".join(sorted(commands.STREAMS)) + " (online training:"
        " train ctr --online)",
        "  serve ctr        predictions from the online trainer's serving copies (TF Serving's REST shape)",
        "  retrain NAME     one scheduled day: ingest, warm-start, evaluate, gated promotion: "
        + ", ".join(sorted(commands.RETRAINERS)),
        "  schedule ctr     the nightly job: score the day with the model in service, then retrain it"
        " (--since: catch-up)",
        "  export MODEL     a trained model as TFLite, float32 and --int8: ctr, unet3d",
        "  templates        write / check the Dataflow Flex Templates of the batch pipelines (templates/)",
        "  launch           N DTensor clients of one trainer on loopback: launch --clients N -- train MODEL ...",
        "  configs          list / show registered configs",
        "  demo             run every pipeline and trainer on small embedded data",
        "  jars             build / locate the Java jars (Flink job server with KafkaIO, Kafka broker)",
        "  stack            start / stop the local Kafka broker or (--flink) a Flink cluster (up, down, status)",
        "",
        "`headrace run PIPELINE --help` lists a pipeline's flags; likewise for train.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_environment()
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(_usage())
            return 0
        verb, rest = argv[0], argv[1:]
        if verb in ("run", "train", "predict", "generate"):
            if not rest or rest[0].startswith("-"):
                if rest and rest[0] in ("-h", "--help"):
                    print(_usage())
                    return 0
                raise ConfigError(
                    f"headrace {verb}: missing the {'pipeline' if verb == 'run' else 'model'} name"
                )
            if verb == "predict":
                return _train(rest[0], rest[1:], commands.PREDICTORS)
            if verb == "generate":
                return _train(rest[0], rest[1:], commands.GENERATORS)
            return (_run if verb == "run" else _train)(rest[0], rest[1:])
        if verb == "stream":
            if not rest or rest[0].startswith("-"):
                raise ConfigError("headrace stream: missing the command (ctr-join, replay)")
            return _stream(rest[0], rest[1:])
        if verb == "serve":
            if not rest or rest[0].startswith("-"):
                raise ConfigError("headrace serve: missing what to serve (ctr)")
            return _serve(rest[0], rest[1:])
        if verb == "retrain":
            if not rest or rest[0].startswith("-"):
                raise ConfigError("headrace retrain: missing what to retrain (ctr, crowd)")
            return _retrain(rest[0], rest[1:])
        if verb == "export":
            from headrace.runners import export

            _setup_logging(False)
            return export.main(rest)
        if verb == "launch":
            from headrace.runners import launch

            return launch.main(rest)
        if verb == "templates":
            from headrace.runners import templates

            return templates.main(rest)
        if verb == "schedule":
            from headrace.runners import schedule

            _setup_logging(False)
            return schedule.main(rest)
        if verb == "configs":
            return _configs(rest)
        if verb == "demo":
            return _demo(rest)
        if verb == "jars":
            return _jars(rest)
        if verb == "stack":
            return _stack(rest)
        raise ConfigError(
            f"unknown command {verb!r} (commands: run, train, predict, generate, stream, serve, retrain, schedule, "
            "templates, export, launch, configs, demo, jars, stack)"
        )
    except HeadraceError as exc:
        print(f"headrace: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("headrace: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
