"""``headrace launch --clients N -- train MODEL ...``: N DTensor clients as local processes on loopback.

Each client is ``headrace train MODEL ... --num-clients N --client-id I --jobs 127.0.0.1:P0,...`` on
ports chosen here; their output is streamed with a ``[client I]`` prefix. When a client exits non-zero
(or is killed) the launcher stops the others (SIGTERM, then SIGKILL after `grace` seconds: a client
left alone would wait in its next collective forever) and exits with that client's status, naming it.
Interrupting the launcher stops every client. On many hosts, start one client per host the same way
with the jobs list of all of them (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from headrace.core.errors import ConfigError

__all__ = ["free_ports", "launch", "main"]

GRACE_SECONDS = 10.0
_LIBC: list = []


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host` now (bound together, then released for the clients to take)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _pump(stream, prefix: str, out, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        with lock:
            out.write(f"{prefix} {line}\n")
            out.flush()
    stream.close()


def _own_session_dying_with_the_launcher() -> None:
    """In the client, before exec: its own process group (stopped as one), and SIGKILL when the launcher
    dies, however it dies (Linux PR_SET_PDEATHSIG): no client outlives a killed launcher."""
    os.setsid()
    if _LIBC:  # loaded before the fork: the child runs no import (another thread may hold the lock)
        _LIBC[0].prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _stop(procs: Sequence[subprocess.Popen], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def launch(
    clients: int,
    command: Sequence[str],
    *,
    host: str = "127.0.0.1",
    ports: Sequence[int] | None = None,
    grace: float = GRACE_SECONDS,
    out=None,
) -> int:
    """Runs `command` (``train MODEL ...``) as `clients` DTensor clients; returns 0 when all succeed, else
    the status of the first that failed."""
    out = out or sys.stdout
    command = list(command)
    if clients < 1:
        raise ConfigError(f"--clients {clients}: must be >= 1")
    if not command or command[0] != "train":
        raise ConfigError("headrace launch: the command after -- must be `train MODEL ...`")
    for flag in ("--num-clients", "--client-id", "--jobs"):
        if any(a == flag or a.startswith(flag + "=") for a in command):
            raise ConfigError(f"headrace launch sets {flag} itself; leave it out of the command")
    ports = list(ports) if ports else free_ports(clients, host)
    if sys.platform.startswith("linux") and not _LIBC:
        import ctypes

        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    jobs = ",".join(f"{host}:{p}" for p in ports)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    for s in previous:
        signal.signal(s, interrupted)
    try:
        for i in range(clients):
            argv = [sys.executable, "-m", "headrace.runners.cli", *command]
            argv += ["--num-clients", str(clients), "--client-id", str(i), "--jobs", jobs]
            p = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_own_session_dying_with_the_launcher,
            )
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[client {i}]", out, lock), daemon=True)
            t.start()
            pumps.append(t)
        with lock:
            out.write(f"[launch] {clients} clients on {jobs}\n")
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                _stop(procs, grace)
                for t in pumps:
                    t.join(timeout=5)
                why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
                with lock:
                    out.write(f"[launch] client {i} failed ({why}); stopped the other clients\n")
                    out.flush()
                print(f"headrace launch: client {i} of {clients} failed ({why})", file=sys.stderr)
                return code if code > 0 else 128 - code
            if all(c == 0 for c in codes):
                for t in pumps:
                    t.join(timeout=5)
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs, grace)
        print("headrace launch: interrupted; stopped every client", file=sys.stderr)
        return 130
    finally:
        _stop(procs, 0.0)
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if "--" not in argv:
        raise ConfigError("usage: headrace launch --clients N [--host H] -- train MODEL [flags]")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="headrace launch", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True, help="DTensor clients to start")
    parser.add_argument("--host", default="127.0.0.1", help="address every client listens on")
    parser.add_argument(
        "--grace", type=float, default=GRACE_SECONDS, help="seconds between SIGTERM and SIGKILL"
    )
    args = parser.parse_args(argv[:split])
    return launch(args.clients, argv[split + 1 :], host=args.host, grace=args.grace)
