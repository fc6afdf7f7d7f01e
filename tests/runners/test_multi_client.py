"""Multi-client DTensor: `headrace launch` runs N client processes holding one mesh; 2 clients x 4 devices
train the same model as 1 client x 8 (same loss at every step, same final weights), each client reading
only its own files; a client that dies stops the others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from headrace.core import cluster
from headrace.core.errors import ConfigError
from headrace.pipelines import example
from headrace.runners import launch

CLI = [sys.executable, "-m", "headrace.runners.cli"]


def _history(out: Path) -> dict[str, list[float]]:
    """Every scalar of the run's TensorBoard events, by tag, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(out.glob("tensorboard/**/events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            key = f"{events.parent.relative_to(out)}/{tag}"
            found.setdefault(key, []).extend(
                (e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)
            )
    return {k: [v for _, v in sorted(points)] for k, points in found.items()}


def _weights(out: Path) -> dict[str, np.ndarray]:
    """Every variable of every final checkpoint under OUT/checkpoint."""
    weights = {}
    for index in sorted(out.glob("checkpoint/**/*.index")):
        reader = tf.train.load_checkpoint(str(index)[: -len(".index")])
        for name in reader.get_variable_to_shape_map():
            if "save_counter" not in name and not name.startswith("_CHECKPOINTABLE"):
                weights[f"{index.relative_to(out)}:{name}"] = reader.get_tensor(name)
    return weights


def _launch(
    tmp_path: Path, clients: int, args: list[str], timeout: float = 400
) -> subprocess.CompletedProcess:
    log = tmp_path / "launch.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [*CLI, "launch", "--clients", str(clients), "--", *args],
            stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )  # fmt: skip
    proc.stdout = log.read_text()
    return proc


def _assert_same_training(one: Path, two: Path, steps: int) -> None:
    h1, h2 = _history(one), _history(two)
    losses = [k for k in h1 if k.endswith("/loss")]
    assert losses, f"no loss in {sorted(h1)}"
    for k in losses:
        assert len(h1[k]) == steps
        np.testing.assert_allclose(h2[k], h1[k], rtol=1e-6, atol=1e-7, err_msg=k)
    w1, w2 = _weights(one), _weights(two)
    assert len(w1) > 5 and set(w1) == set(w2)
    for k in w1:
        if w1[k].dtype.kind == "f":
            np.testing.assert_allclose(w2[k], w1[k], rtol=1e-5, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(w2[k], w1[k], err_msg=k)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["clients"] == 2 and m2["local_devices"] == 4 and m2["devices"] == m1["devices"] == 8
    assert "clients" not in m1


def _train_one_client(module: str, config) -> None:
    """1 client x 8 devices, in this process (the suite's 8 virtual CPUs)."""
    import importlib

    importlib.import_module(f"headrace.runners.{module}").train_and_evaluate(config)


@pytest.mark.parametrize("model", ["ctr", "mlp"])
def test_two_clients_train_what_one_client_trains(model, ctr_shards, example_output, tmp_path):
    data = ctr_shards if model == "ctr" else example_output
    flags = {"ctr": ["--batch-size", "256"], "mlp": ["--batch-size", "64"]}[model]
    common = ["--data", str(data), "--mesh", "batch=4,model=2", "--steps", "3", *flags]
    two = tmp_path / "two"
    proc = _launch(tmp_path, 2, ["train", model, *common, "--output", str(two)])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "[client 0]" in proc.stdout and "[client 1]" in proc.stdout
    assert not list(tmp_path.glob(".*partial")), "a client left its scratch or staging directory"
    # The same two input streams, read by one client.
    one = tmp_path / "one"
    if model == "ctr":
        from headrace.runners.train_ctr import CTRTrainConfig

        config = CTRTrainConfig(data=str(data), output=str(one), mesh="batch=4,model=2", steps=3, batch_size=256,
                                input_shards=2)  # fmt: skip
        _train_one_client("train_ctr", config)
    else:
        from headrace.runners.train_mlp import MLPTrainConfig

        config = MLPTrainConfig(data=str(data), output=str(one), mesh="batch=4,model=2", steps=3, batch_size=64,
                                input_shards=2)  # fmt: skip
        _train_one_client("train_mlp", config)
    _assert_same_training(one, two, steps=3)


def test_each_client_reads_only_its_own_files(example_output):
    """The two clients' streams cover every training record once: no file is read by both."""
    files = sorted(str(p) for p in example_output.glob("train-*.tfrecord*"))
    assert len(files) >= 2
    seen = []
    for index in range(2):
        share = cluster.Share((index,), 2)
        assert share.files(files, "x") == [files[index::2]]
        ds = example.dataset(str(example_output), "train", 8, share=share)
        seen.append([bytes(r) for b in ds.as_numpy_iterator() for r in b["id"]])
    whole = example.dataset(str(example_output), "train", 8)
    every = [bytes(r) for b in whole.as_numpy_iterator() for r in b["id"]]
    assert not set(seen[0]) & set(seen[1])
    # whole batches only per stream: at most a batch's remainder of each file group is left out
    assert set(seen[0]) | set(seen[1]) <= set(every)
    assert len(set(every) - set(seen[0]) - set(seen[1])) < 2 * 8


def test_input_shares_and_their_errors(monkeypatch):
    for key in ("DTENSOR_NUM_CLIENTS", "DTENSOR_CLIENT_ID", "DTENSOR_JOBS", "DTENSOR_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    assert cluster.input_share() is None
    assert cluster.input_share(type("C", (), {"input_shards": 4})()) == cluster.Share((0, 1, 2, 3), 4)
    cluster.Clients.of(2, 1, "127.0.0.1:1,127.0.0.1:2").export()
    assert os.environ["DTENSOR_CLIENT_ID"] == "1" and cluster.Clients.current().count == 2
    assert cluster.input_share() == cluster.Share((1,), 2)
    assert cluster.input_share(type("C", (), {"input_shards": 4})()) == cluster.Share((2, 3), 4)
    with pytest.raises(ConfigError, match="multiple of the 2 clients"):
        cluster.input_share(type("C", (), {"input_shards": 3})())
    with pytest.raises(ConfigError, match="cannot be split into 2 input streams"):
        cluster.Share((1,), 2).files(["only-one"], "OUT/train")
    cluster.Clients().export()
    assert "DTENSOR_NUM_CLIENTS" not in os.environ
    with pytest.raises(ConfigError, match="one host:port per client"):
        cluster.Clients.of(2, 0, "127.0.0.1:1")
    with pytest.raises(ConfigError, match="client-id 2"):
        cluster.Clients.of(2, 2, "a:1,b:2")
    with pytest.raises(ConfigError, match="sets --jobs itself"):
        launch.launch(2, ["train", "mlp", "--jobs", "x:1"])


def test_a_client_that_dies_stops_the_others(example_output, tmp_path):
    out = tmp_path / "mlp"
    args = ["train", "mlp", "--data", str(example_output), "--output", str(out), "--mesh", "batch=4,model=2",
            "--batch-size", "64", "--steps", "100000", "--log-every-seconds", "1"]  # fmt: skip
    log = tmp_path / "launch.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([*CLI, "launch", "--clients", "2", "--grace", "5", "--", *args], stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while "[client 1]" not in log.read_text() or "steps/s" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the clients never started training"
            time.sleep(0.5)
        # the launcher appends --num-clients, --client-id and --jobs after the command
        pids = subprocess.run(["pgrep", "-f", f"{out} .*--client-id 1 "], capture_output=True,
                              text=True).stdout.split()  # fmt: skip
        pids = [int(p) for p in pids if int(p) != proc.pid]
        assert pids, "client 1 not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert "client 1 failed (killed by signal 9); stopped the other clients" in text
    # client 0 is gone too: nothing of this run is still alive
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"
    assert not out.exists()
