"""DTensor meshes, layouts and layout-independent initialisation.

A mesh is written as ``batch=4,model=2``: named dimensions, their sizes multiplying to the device count.
`create_mesh` puts it on GPUs when enough are present, otherwise on virtual CPU devices (the first physical
CPU split into logical devices, which must happen before TensorFlow initialises its runtime; tests and the
CLI call `configure_virtual_devices` first thing). Under several DTensor clients (`headrace.core.cluster`)
each process holds its share of the devices and the mesh is DTensor's distributed mesh over all of them. A mesh that needs more GPUs than are present runs on
virtual CPUs with a warning that says so. ``auto`` (the trainers' default) is ``batch=4,model=2`` where
there are no GPUs and a mesh of the GPUs present where there are (`auto_mesh`).

Initialisation is stateless and layout-independent: values are drawn unsharded from an explicit seed and
then laid out. DTensor's own expansion of a stateless random op under a sharded layout derives a seed per
device, so the same seed would give different weights on different meshes, and sharded and unsharded runs
could not be compared number for number. Stateful RNG ops are refused by DTensor anyway.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np

from headrace.core import cluster
from headrace.core.errors import ConfigError, HeadraceError

__all__ = [
    "AUTO",
    "UNSHARDED",
    "auto_mesh",
    "batch_layout",
    "configure_virtual_devices",
    "create_mesh",
    "initial_value",
    "layout",
    "parse_mesh",
    "replicated",
    "shard_batch",
    "to_numpy",
    "variable",
]

UNSHARDED = "unsharded"
AUTO = "auto"
CPU_DEFAULT = (("batch", 4), ("model", 2))

_log = logging.getLogger("headrace.mesh")


def _tf():
    import tensorflow as tf

    return tf


def _dtensor():
    from tensorflow.experimental import dtensor

    return dtensor


def auto_mesh(gpus: int | None = None) -> list[tuple[str, int]]:
    """The mesh ``auto`` stands for: ``batch=4,model=2`` on CPUs (and on 8 or more GPUs); on 1..7 GPUs,
    all of them: ``batch=G/2,model=2`` for an even count, ``batch=G,model=1`` otherwise."""
    if gpus is None:
        gpus = len(_tf().config.list_physical_devices("GPU"))
    if gpus == 0 or gpus >= 8:
        return list(CPU_DEFAULT)
    return [("batch", gpus // 2), ("model", 2)] if gpus % 2 == 0 else [("batch", gpus), ("model", 1)]


def parse_mesh(spec: str | Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """``"batch=4,model=2"`` -> ``[("batch", 4), ("model", 2)]``; ``"auto"`` -> `auto_mesh`; raises
    ConfigError on bad specs."""
    if not isinstance(spec, str):
        return [(str(n), int(s)) for n, s in spec]
    if spec.strip() == AUTO:
        return auto_mesh()
    dims = []
    for part in spec.split(","):
        name, sep, size = part.strip().partition("=")
        if not sep or not name.strip().isidentifier():
            raise ConfigError(f"--mesh {spec!r}: expected NAME=SIZE[,NAME=SIZE...], e.g. batch=4,model=2")
        try:
            n = int(size)
        except ValueError:
            raise ConfigError(f"--mesh {spec!r}: size of {name!r} must be an integer") from None
        if n < 1:
            raise ConfigError(f"--mesh {spec!r}: size of {name!r} must be >= 1")
        dims.append((name.strip(), n))
    names = [n for n, _ in dims]
    if len(set(names)) != len(names):
        raise ConfigError(f"--mesh {spec!r}: dimension names repeat")
    return dims


def configure_virtual_devices(n: int = 8) -> None:
    """Splits the first physical CPU into `n` logical devices (no-op if already so or more).

    Must run before TensorFlow initialises its runtime (before the first op or device query).
    """
    tf = _tf()
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current and len(current) >= n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have < n:
            raise HeadraceError(
                f"a mesh of {n} devices needs {n} virtual CPUs but TensorFlow already started with "
                f"{have}; create the mesh before running any TensorFlow op"
            ) from None


def _spec_text(dims) -> str:
    return ",".join(f"{name}={size}" for name, size in dims)


def default_device_type(devices: int) -> str:
    """GPU when at least `devices` GPUs are present, else CPU (``HEADRACE_DEVICE_TYPE`` overrides)."""
    gpus = len(_tf().config.list_physical_devices("GPU"))
    return (os.environ.get("HEADRACE_DEVICE_TYPE") or ("GPU" if gpus >= devices else "CPU")).upper()


def create_mesh(spec: str | Sequence[tuple[str, int]], device_type: str | None = None):
    """A DTensor mesh over GPUs if at least as many as the mesh needs, else over virtual CPUs."""
    tf, dtensor = _tf(), _dtensor()
    dims = parse_mesh(spec)
    n = math.prod(s for _, s in dims)
    clients = cluster.Clients.current()
    local = clients.local_devices(n)
    if device_type is None:
        gpus = len(tf.config.list_physical_devices("GPU"))
        device_type = default_device_type(local)
        if 0 < gpus < n and device_type.upper() == "CPU":
            _log.warning(
                "mesh %s needs %d devices but %d GPU(s) are present: running on %d virtual CPU devices; "
                "--mesh auto (or one of at most %d devices) uses the GPUs",
                _spec_text(dims),
                n,
                gpus,
                n,
                gpus,
            )
    device_type = device_type.upper()
    if device_type == "CPU":
        configure_virtual_devices(local)
    available = len(tf.config.list_logical_devices(device_type))
    if available < local:
        raise HeadraceError(
            f"mesh {spec!r} needs {local} {device_type} devices"
            + (f" on each of {clients.count} clients" if clients.multi else "")
            + f", {available} available"
        )
    if clients.multi:
        return cluster.distributed_mesh(dims, device_type)
    return dtensor.create_mesh(
        dims, devices=[f"{device_type}:{i}" for i in range(n)], device_type=device_type
    )


def layout(mesh, *dims: str | None):
    """A layout naming, per tensor dimension, the mesh dimension it is sharded on (None = unsharded)."""
    dtensor = _dtensor()
    for d in dims:
        if d not in (None, UNSHARDED) and d not in mesh.dim_names:
            raise ConfigError(f"layout names mesh dimension {d!r}; mesh has {list(mesh.dim_names)}")
    return dtensor.Layout([dtensor.UNSHARDED if d in (None, UNSHARDED) else d for d in dims], mesh)


def replicated(mesh, rank: int):
    return _dtensor().Layout.replicated(mesh, rank)


def batch_layout(mesh, rank: int, batch_dim: str = "batch"):
    """Dimension 0 sharded on `batch_dim` (replicated when the mesh has no such dimension)."""
    if batch_dim not in mesh.dim_names:
        return replicated(mesh, rank)
    return layout(mesh, batch_dim, *([None] * (rank - 1)))


def shard_batch(mesh, value, batch_dim: str = "batch"):
    """Places a host batch on the mesh, split along dimension 0 over `batch_dim`.

    Each device receives only its slice (``dtensor.pack``), not a replicated copy to be sliced later.
    """
    tf, dtensor = _tf(), _dtensor()
    value = tf.convert_to_tensor(value)
    rank = value.shape.rank
    lay = batch_layout(mesh, rank, batch_dim)
    if batch_dim not in mesh.dim_names:
        return dtensor.pack([value] * mesh.num_local_devices(), lay)
    k = mesh.dim_size(batch_dim)
    if value.shape[0] % k:
        raise HeadraceError(
            f"batch of {value.shape[0]} does not split over mesh dimension {batch_dim}={k}; "
            "use a batch size divisible by it"
        )
    pieces = tf.split(value, k, axis=0)
    components = [pieces[loc[batch_dim]] for loc in mesh.local_device_locations()]
    return dtensor.pack(components, lay)


def to_numpy(value) -> np.ndarray:
    """The full (global) value of a DTensor or plain tensor/variable as numpy."""
    tf, dtensor = _tf(), _dtensor()
    if isinstance(value, tf.Variable):
        value = value.read_value()
    try:
        lay = dtensor.fetch_layout(value)
    except Exception:  # not a DTensor
        return np.asarray(value)
    full = dtensor.relayout(value, dtensor.Layout.replicated(lay.mesh, lay.rank))
    return dtensor.unpack(full)[0].numpy()


def initial_value(
    shape: Sequence[int],
    seed: int,
    *,
    kind: str = "glorot_uniform",
    stddev: float = 0.02,
    dtype: str = "float32",
) -> np.ndarray:
    """A host array drawn with TensorFlow's stateless RNG from `seed` (the same on every mesh)."""
    tf = _tf()
    shape = tuple(int(s) for s in shape)
    seed_pair = tf.constant([seed, 0x5EED], dtype=tf.int64)
    with tf.device("CPU:0"):
        if kind == "zeros":
            out = tf.zeros(shape, dtype)
        elif kind == "ones":
            out = tf.ones(shape, dtype)
        elif kind == "normal":
            out = tf.random.stateless_normal(shape, seed_pair, stddev=stddev, dtype=dtype)
        elif kind == "truncated_normal":
            out = tf.random.stateless_truncated_normal(shape, seed_pair, stddev=stddev, dtype=dtype)
        elif kind == "glorot_uniform":
            fan_in = shape[-2] if len(shape) >= 2 else shape[-1]
            fan_out = shape[-1]
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            out = tf.random.stateless_uniform(shape, seed_pair, -limit, limit, dtype=dtype)
        else:
            raise ValueError(f"unknown initializer {kind!r}")
    return out.numpy()


def variable(value, lay=None, *, name: str | None = None, trainable: bool = True):
    """A DVariable holding `value` laid out as `lay`, or a plain tf.Variable when `lay` is None."""
    tf, dtensor = _tf(), _dtensor()
    if lay is None:
        return tf.Variable(value, name=name, trainable=trainable)
    value = tf.convert_to_tensor(value)
    laid = dtensor.relayout(dtensor.copy_to_mesh(value, replicated(lay.mesh, value.shape.rank)), lay)
    return dtensor.DVariable(laid, name=name, trainable=trainable)
