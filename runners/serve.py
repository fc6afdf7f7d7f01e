"""``headrace serve ctr``: predictions from the online trainer's serving copies, in TF Serving's REST shape.

    headrace serve ctr --serving-dir S [--host 127.0.0.1] [--port 8501] [--threads 8]

    POST /v1/models/ctr:predict   {"instances": [{"I1": "3", ..., "C26": "e5ba7672"}, ...]}
                                  -> {"predictions": [0.031, ...]}  (click probabilities)
    GET  /v1/models/ctr           -> {"model_version_status": [{"version": "12", "state": "AVAILABLE", ...}]}
    GET  /metrics                 -> Prometheus text: requests by code, latency, instances, model version

The HTTP layer is waitress (a production WSGI server: its own parser, a thread pool, request size limits)
with Werkzeug's request and response objects; nothing here parses HTTP.

Versions: a watcher thread polls ``S/LATEST`` (`--poll-seconds`) and loads a new version off the request
path, then swaps one reference. A request reads that reference once, so a request in flight finishes on
the version it started with and none waits for a load; the publisher (`ServingPublisher`) replaces
LATEST atomically, so a half-written version is never read.

Bad requests get 400 with the reason naming the instance and field (not JSON, no "instances", an instance
that is not an object, a missing or unknown field, a value that is not a string or number); a body over
`--max-request-bytes` gets 413 before it is read whole; more than `--max-instances` instances, 400.

The server binds 127.0.0.1 unless ``--host`` names another address; a non-loopback address taken from
anywhere else (a registered config, ``--set``) is refused, so exposing it is always a visible choice.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import socket
import threading
import time
from pathlib import Path

import tensorflow as tf
from werkzeug.wrappers import Request, Response

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError, InputError
from headrace.models.criteo import FIELDS

__all__ = ["PredictionService", "ServeConfig", "is_loopback", "serve"]

_log = logging.getLogger("headrace.serve")
_FIELDS = frozenset(FIELDS)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    serving_dir: str = dataclasses.field(
        default="", metadata={"help": "the online trainer's --serving-dir (S/LATEST, S/<version>/)"}
    )
    host: str = dataclasses.field(default="127.0.0.1", metadata={"help": "address to bind (loopback)"})
    port: int = 8501
    threads: int = 8
    max_request_bytes: int = dataclasses.field(default=1 << 20, metadata={"help": "larger bodies get 413"})
    max_instances: int = 1024
    poll_seconds: float = dataclasses.field(default=0.5, metadata={"help": "how often LATEST is checked"})
    model_name: str = "ctr"


@config_lib.register("serve-ctr", command="serve ctr")
def serve_ctr() -> ServeConfig:
    """Serve the newest CTR serving copy on 127.0.0.1:8501."""
    return ServeConfig()


def is_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


class BadRequest(ValueError):
    """A request that cannot be answered; the message says why (sent back with 400)."""


def parse_instances(body: bytes, max_instances: int) -> dict[str, list[str]]:
    """The request body -> one column of strings per field; `BadRequest` naming what is wrong."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(request, dict) or "instances" not in request:
        raise BadRequest('body must be an object with "instances": a list of objects of the 39 fields')
    instances = request["instances"]
    if not isinstance(instances, list) or not instances:
        raise BadRequest('"instances" must be a non-empty list')
    if len(instances) > max_instances:
        raise BadRequest(f"{len(instances)} instances: at most {max_instances} per request")
    columns: dict[str, list[str]] = {name: [] for name in FIELDS}
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise BadRequest(f"instances[{i}] is not an object")
        unknown = set(instance) - _FIELDS
        if unknown:
            raise BadRequest(
                f"instances[{i}]: unknown field {sorted(unknown)[0]!r} (fields are I1..I13, C1..C26)"
            )
        for name in FIELDS:
            if name not in instance:
                raise BadRequest(f"instances[{i}]: missing field {name!r}")
            value = instance[name]
            if isinstance(value, bool) or not isinstance(value, str | int | float | type(None)):
                raise BadRequest(f"instances[{i}].{name}: expected a string or a number")
            columns[name].append("" if value is None else value if isinstance(value, str) else f"{value:g}")
    return columns


class _Version:
    """One loaded serving copy: its name, its serving function and its sync.json."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self._loaded = tf.saved_model.load(str(root / name))
        self._serve = self._loaded.signatures["serving_default"]
        info = root / name / "sync.json"
        self.info = json.loads(info.read_text()) if info.is_file() else {}

    def predict(self, columns: dict[str, list[str]]) -> list[float]:
        out = self._serve(**{k: tf.constant(v, tf.string) for k, v in columns.items()})["probability"]
        return [round(float(p), 6) for p in out.numpy()]


class PredictionService:
    """The WSGI application and the version watcher (`start` / `stop`)."""

    def __init__(self, config: ServeConfig):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.config = config
        self.root = Path(config.serving_dir)
        self.current: _Version | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "headrace_serve_requests", "Requests answered", ["path", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "headrace_serve_request_seconds", "Time to answer a predict request", registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
        )  # fmt: skip
        self.instances = Counter("headrace_serve_instances", "Instances predicted", registry=self.registry)
        self.version = Gauge("headrace_serve_model_version", "Serving copy answering", registry=self.registry)
        self.swaps = Counter("headrace_serve_version_loads", "Serving copies loaded", registry=self.registry)

    # -- versions ---------------------------------------------------------------------------------

    def _latest(self) -> str | None:
        latest = self.root / "LATEST"
        return latest.read_text().strip() if latest.is_file() else None

    def refresh(self) -> bool:
        """Loads the version LATEST names if it is not the one answering; True if it swapped."""
        name = self._latest()
        if name is None or (self.current is not None and self.current.name == name):
            return False
        loaded = _Version(self.root, name)  # off the request path: requests use `current` meanwhile
        self.current = loaded  # one reference assignment: a request sees the old version or the new
        self.version.set(int(name) if name.isdigit() else 0)
        self.swaps.inc()
        _log.info("serve: version %s loaded (%s)", name, loaded.info.get("rows", "?"))
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.config.poll_seconds):
            try:
                self.refresh()
            except Exception:  # a version deleted while loading, a partial directory: keep serving
                _log.exception("serve: loading %s failed; still answering with %s", self._latest(),
                               self.current.name if self.current else None)  # fmt: skip

    def start(self) -> None:
        self.refresh()
        self._watcher = threading.Thread(target=self._watch, name="serving-copy-watcher", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    # -- requests ---------------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        request = Request(environ)
        name = self.config.model_name
        path = request.path
        try:
            if path == f"/v1/models/{name}:predict" and request.method == "POST":
                response = self._predict(request)
            elif path == f"/v1/models/{name}" and request.method == "GET":
                response = self._status()
            elif path == "/metrics" and request.method == "GET":
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                response = Response(generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST)
            elif path in (f"/v1/models/{name}:predict", f"/v1/models/{name}", "/metrics"):
                response = _error(405, f"{request.method} is not allowed on {path}")
            else:
                response = _error(404, f"no such endpoint {path} (POST /v1/models/{name}:predict)")
        except Exception as exc:  # a bug or a model that failed: 500 with the reason, the server lives on
            _log.exception("serve: %s failed", path)
            response = _error(500, f"{type(exc).__name__}: {exc}")
        self.requests.labels(
            "predict" if path.endswith(":predict") else path, str(response.status_code)
        ).inc()
        return response(environ, start_response)

    def _predict(self, request):
        start = time.perf_counter()
        length = request.content_length
        if length is None:
            return _error(411, "a Content-Length is required")
        if length > self.config.max_request_bytes:
            return _error(413, f"body of {length} bytes: at most {self.config.max_request_bytes}")
        try:
            columns = parse_instances(request.get_data(cache=False), self.config.max_instances)
        except BadRequest as exc:
            return _error(400, str(exc))
        version = self.current  # read once: this request finishes on this version
        if version is None:
            return _error(503, f"no serving copy yet in {self.root} (no LATEST)")
        predictions = version.predict(columns)
        self.instances.inc(len(predictions))
        self.latency.observe(time.perf_counter() - start)
        return _json(200, {"predictions": predictions}, {"X-Model-Version": version.name})

    def _status(self):
        version = self.current
        if version is None:
            return _json(200, {"model_version_status": [{"version": "0", "state": "LOADING",
                                                         "status": {"error_code": "OK", "error_message": ""}}]})  # fmt: skip
        state = {"version": str(int(version.name)) if version.name.isdigit() else version.name, "state": "AVAILABLE",
                 "status": {"error_code": "OK", "error_message": ""}}  # fmt: skip
        return _json(200, {"model_version_status": [state], "sync": version.info})


def _json(code: int, body: dict, headers: dict | None = None):
    return Response(json.dumps(body), status=code, content_type="application/json", headers=headers)


def _error(code: int, message: str):
    return _json(code, {"error": message})


def serve(config: ServeConfig, *, host_given: bool = True, ready=None) -> int:
    """Runs the server until SIGINT/SIGTERM. `host_given`: whether ``--host`` was on the command line
    (a non-loopback address from anywhere else is refused). `ready(port)` is called once listening."""
    import waitress

    if not config.serving_dir or not Path(config.serving_dir).is_dir():
        raise InputError(f"--serving-dir {config.serving_dir!r}: no such directory")
    if not is_loopback(config.host) and not host_given:
        raise ConfigError(
            f"host {config.host!r} is not a loopback address: name it with --host to serve beyond this machine"
        )
    if config.threads < 1 or config.max_request_bytes < 1 or config.max_instances < 1:
        raise ConfigError("--threads, --max-request-bytes and --max-instances must be >= 1")
    service = PredictionService(config)
    service.start()
    server = waitress.create_server(
        service,
        host=config.host,
        port=config.port,
        threads=config.threads,
        # The application answers an oversized body with 413 and a JSON reason from its Content-Length,
        # before reading it; waitress's own limit, above it, bounds what a client can make it buffer.
        max_request_body_size=2 * config.max_request_bytes + 65536,
        ident="headrace",
    )
    port = server.effective_port
    _log.info("serve: http://%s:%s/v1/models/%s (version %s)", config.host, port, config.model_name,
              service.current.name if service.current else "none yet")  # fmt: skip
    if ready is not None:
        ready(port)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        service.stop()
    return 0
