"""Meshes from specs, batch sharding, layout-independent initialisation."""

from __future__ import annotations

import numpy as np
import pytest
from tensorflow.experimental import dtensor

from headrace.core import mesh as mesh_lib
from headrace.core.errors import ConfigError, HeadraceError


def test_parse_mesh():
    assert mesh_lib.parse_mesh("batch=4,model=2") == [("batch", 4), ("model", 2)]
    for bad in ["batch", "batch=x", "batch=0", "batch=2,batch=2", "4=batch"]:
        with pytest.raises(ConfigError, match="--mesh"):
            mesh_lib.parse_mesh(bad)


def test_mesh_on_virtual_cpus():
    mesh = mesh_lib.create_mesh("batch=4,model=2")
    assert mesh.device_type() == "CPU"
    assert mesh.num_local_devices() == 8
    assert mesh.dim_size("batch") == 4 and mesh.dim_size("model") == 2
    with pytest.raises(HeadraceError, match="16 devices needs 16 virtual CPUs"):
        mesh_lib.create_mesh("batch=16")


def test_shard_batch_gives_each_device_its_slice():
    mesh = mesh_lib.create_mesh("batch=4,model=2")
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    dx = mesh_lib.shard_batch(mesh, x)
    assert dtensor.fetch_layout(dx).sharding_specs == ["batch", dtensor.UNSHARDED]
    components = dtensor.unpack(dx)
    for loc, component in zip(mesh.local_device_locations(), components):
        b = loc["batch"]
        np.testing.assert_array_equal(component.numpy(), x[2 * b : 2 * b + 2])
    np.testing.assert_array_equal(mesh_lib.to_numpy(dx), x)
    with pytest.raises(HeadraceError, match="does not split"):
        mesh_lib.shard_batch(mesh, np.zeros((6, 3)))


@pytest.mark.parametrize("dims", [(None, None), (None, "model"), ("batch", "model"), ("model", None)])
def test_initial_values_do_not_depend_on_the_layout(dims):
    mesh = mesh_lib.create_mesh("batch=4,model=2")
    value = mesh_lib.initial_value((8, 6), seed=3, kind="normal")
    var = mesh_lib.variable(value, mesh_lib.layout(mesh, *dims))
    assert dtensor.fetch_layout(var).sharding_specs == [d or dtensor.UNSHARDED for d in dims]
    np.testing.assert_array_equal(mesh_lib.to_numpy(var), value)
    np.testing.assert_array_equal(value, mesh_lib.initial_value((8, 6), seed=3, kind="normal"))


def test_auto_mesh_fits_the_gpus_present():
    assert mesh_lib.auto_mesh(0) == [("batch", 4), ("model", 2)]
    assert mesh_lib.auto_mesh(1) == [("batch", 1), ("model", 1)]
    assert mesh_lib.auto_mesh(2) == [("batch", 1), ("model", 2)]
    assert mesh_lib.auto_mesh(3) == [("batch", 3), ("model", 1)]
    assert mesh_lib.auto_mesh(8) == [("batch", 4), ("model", 2)]
    assert mesh_lib.parse_mesh("auto") == [("batch", 4), ("model", 2)]  # this machine has no GPU


def test_a_mesh_larger_than_the_gpus_present_says_it_runs_on_cpus(monkeypatch, caplog):
    import tensorflow as tf

    real = tf.config.list_physical_devices
    # One GPU as the machine would list it (this one has none): the choice, not the device, is tested.
    monkeypatch.setattr(
        tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else real(kind)
    )
    with caplog.at_level("WARNING", logger="headrace.mesh"):
        mesh = mesh_lib.create_mesh("batch=4,model=2")
    assert mesh.device_type() == "CPU"
    (record,) = [r for r in caplog.records if r.name == "headrace.mesh"]
    assert "needs 8 devices but 1 GPU(s) are present: running on 8 virtual CPU devices" in record.getMessage()
    assert mesh_lib.parse_mesh("auto") == [("batch", 1), ("model", 1)]
