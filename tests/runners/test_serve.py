"""`headrace serve ctr`: TF Serving's REST shape over the serving copies, hot swaps under load with no
failed request, 400s with reasons, loopback unless --host says otherwise. The server runs as the CLI
process a user starts, on a free loopback port, and is stopped (SIGTERM) when the module's tests end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests

from headrace.core.errors import ConfigError
from headrace.models.criteo import FIELDS
from headrace.models.ctr import CTRModel, CTRModelConfig
from headrace.models.ctr_serving import ServingCTR, save_serving
from headrace.runners.serve import BadRequest, ServeConfig, parse_instances, serve

CONFIG = CTRModelConfig(name="fm", embedding_dim=4)


def publish(root, version: int, shift: float) -> None:
    """A serving copy as the online trainer publishes one: S/<version>/ then LATEST replaced atomically."""
    dense = [v.numpy() for v in CTRModel(CONFIG).weights]
    module = ServingCTR(CONFIG, [], np.zeros((0, 4)), np.zeros((0, 1)), dense, np.ones(39), shift)
    staging = root / f".{version:08d}.staging"
    save_serving(module, staging)
    (staging / "sync.json").write_text(json.dumps({"version": version}))
    os.replace(staging, root / f"{version:08d}")
    (root / ".LATEST.tmp").write_text(f"{version:08d}\n")
    os.replace(root / ".LATEST.tmp", root / "LATEST")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


INSTANCE = {name: ("3" if name.startswith("I") else "e5ba7672") for name in FIELDS}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    publish(root, 1, 0.0)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "headrace.runners.cli", "serve", "ctr", "--serving-dir", str(root),
         "--port", str(port), "--poll-seconds", "0.2", "--max-request-bytes", "200000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"{url}/v1/models/ctr", timeout=5).ok:
                break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.3)
    yield root, url, port
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def _predict(url, instances, **kwargs):
    return requests.post(f"{url}/v1/models/ctr:predict", json={"instances": instances}, timeout=30, **kwargs)


def test_predictions_in_tf_servings_shape(server):
    _, url, _ = server
    r = _predict(url, [INSTANCE, {**INSTANCE, "I1": 7, "C3": ""}])
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["predictions"] and len(body["predictions"]) == 2
    assert all(0 < p < 1 for p in body["predictions"])
    status = requests.get(f"{url}/v1/models/ctr", timeout=5).json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "body is not JSON"),
        (b'{"rows": []}', '"instances"'),
        (b'{"instances": []}', "non-empty list"),
        (b'{"instances": [3]}', "instances[0] is not an object"),
        (
            json.dumps({"instances": [{k: v for k, v in INSTANCE.items() if k != "C7"}]}).encode(),
            "missing field 'C7'",
        ),
        (json.dumps({"instances": [{**INSTANCE, "C99": "x"}]}).encode(), "unknown field 'C99'"),
        (json.dumps({"instances": [{**INSTANCE, "I2": [1]}]}).encode(), "instances[0].I2: expected a string"),
    ],
)
def test_bad_requests_get_400_with_the_reason(server, body, reason):
    _, url, _ = server
    r = requests.post(f"{url}/v1/models/ctr:predict", data=body, timeout=10)
    assert r.status_code == 400 and reason in r.json()["error"], r.text


def test_size_bounds_and_unknown_paths(server):
    _, url, _ = server
    r = _predict(url, [INSTANCE] * 470)  # 298 kB, over --max-request-bytes 200,000: refused unread
    assert r.status_code == 413 and "at most 200000" in r.json()["error"]
    assert _predict(url, [INSTANCE] * 1025).status_code == 413  # past twice that, waitress refuses it
    assert requests.get(f"{url}/v1/models/other", timeout=5).status_code == 404
    assert requests.get(f"{url}/v1/models/ctr:predict", timeout=5).status_code == 405


def test_a_new_version_is_swapped_in_under_load_with_no_failed_request(server):
    root, url, _ = server
    before = _predict(url, [INSTANCE]).json()["predictions"][0]
    results, stop = [], threading.Event()

    def client():
        session = requests.Session()
        for _ in range(2000):  # bounded: stops by itself
            if stop.is_set():
                return
            r = session.post(f"{url}/v1/models/ctr:predict", json={"instances": [INSTANCE] * 8}, timeout=30)
            results.append(
                (r.status_code, r.headers.get("X-Model-Version"), r.json().get("predictions", [None])[0])
            )

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    publish(root, 2, 3.0)  # the logit shifts by 3: every prediction moves
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(v == "00000002" for _, v, _ in results[-50:]):
        time.sleep(0.2)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert results and all(code == 200 for code, _, _ in results)
    versions = [v for _, v, _ in results]
    assert versions[0] == "00000001" and versions[-1] == "00000002"
    after = {p for _, v, p in results if v == "00000002"}
    assert len(after) == 1 and next(iter(after)) > before
    metrics = requests.get(f"{url}/metrics", timeout=5).text
    assert 'headrace_serve_requests_total{code="200",path="predict"}' in metrics
    assert (
        "headrace_serve_model_version 2.0" in metrics and "headrace_serve_request_seconds_bucket" in metrics
    )


def test_the_server_binds_loopback_by_default(server):
    _, _, port = server
    # This machine's own non-loopback addresses (its interfaces) do not reach the server.
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout.split()
    addresses = [a for a in out if "." in a and not a.startswith("127.")]
    if not addresses:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    for address in addresses:
        with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
            pass


def test_a_non_loopback_host_must_come_from_host(tmp_path, capsys):
    with pytest.raises(ConfigError, match="name it with --host"):
        serve(ServeConfig(serving_dir=str(tmp_path), host="0.0.0.0"), host_given=False)
    from headrace.runners import cli

    argv = ["serve", "ctr", "--serving-dir", str(tmp_path), "--set", "host=0.0.0.0"]
    assert cli.main(argv) == 2
    assert "not a loopback address" in capsys.readouterr().err


def test_parse_instances_takes_numbers_and_nulls():
    columns = parse_instances(json.dumps({"instances": [{**INSTANCE, "I1": 2.5, "I2": None}]}).encode(), 4)
    assert columns["I1"] == ["2.5"] and columns["I2"] == [""] and columns["C1"] == ["e5ba7672"]
    with pytest.raises(BadRequest, match="at most 4"):
        parse_instances(json.dumps({"instances": [INSTANCE] * 5}).encode(), 4)
