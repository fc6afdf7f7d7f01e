"""Multi-client DTensor: several processes (clients) holding one mesh between them.

DTensor's own set-up is four environment variables read when the accelerator system is initialised:
``DTENSOR_CLIENT_ID``, ``DTENSOR_NUM_CLIENTS``, ``DTENSOR_JOB_NAME`` and ``DTENSOR_JOBS`` (every client's
``host:port``, in client order). `Clients` is that set-up as a value; `Clients.export` writes it into
the environment (the CLI does so from ``--num-clients``, ``--client-id`` and ``--jobs``) and
`Clients.current` reads it back, so a process started by DTensor's own tooling works the same.

Each client owns ``mesh size / clients`` devices: client ``i`` holds the devices ``i * L ... (i+1) * L - 1``
of the mesh in row-major order, so with ``batch`` the first mesh dimension a client holds whole, contiguous
rows of the batch. What crosses between clients is what DTensor's SPMD expansion decides (the
gradient all-reduce, relayouts), plus `gather`: a client's host batch all-gathered into the global one
(the CTR trainer needs every id of the global batch for its host table).

The training input is read in ``input_shards`` streams (`Share`), each over every ``input_shards``-th
file; a client reads only its own streams, and runs with the same ``input_shards`` train on the same
global batches whatever the number of clients (the tests compare 2 clients x 4 devices with 1 x 8).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np

from headrace.core.errors import ConfigError

__all__ = ["Clients", "Share", "barrier", "gather", "input_share", "place_local", "shutdown"]

_log = logging.getLogger("headrace.cluster")

JOB_NAME = "worker"
_ENV = ("DTENSOR_CLIENT_ID", "DTENSOR_NUM_CLIENTS", "DTENSOR_JOB_NAME", "DTENSOR_JOBS")
_initialized: list[str] = []  # the device type the accelerator system was initialised with


@dataclasses.dataclass(frozen=True)
class Clients:
    """How many clients hold the mesh, which one this process is, and where each listens."""

    count: int = 1
    index: int = 0
    jobs: tuple[str, ...] = ()

    def __post_init__(self):
        if self.count < 1:
            raise ConfigError(f"--num-clients {self.count}: must be >= 1")
        if not 0 <= self.index < self.count:
            raise ConfigError(f"--client-id {self.index}: must be in 0..{self.count - 1}")
        if self.count > 1 and len(self.jobs) != self.count:
            raise ConfigError(
                f"--jobs lists {len(self.jobs)} address(es) for {self.count} clients: give one host:port per "
                "client, in client order (headrace launch does)"
            )
        for job in self.jobs:
            host, sep, port = job.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"--jobs: {job!r} is not host:port")

    @property
    def multi(self) -> bool:
        return self.count > 1

    @property
    def chief(self) -> bool:
        """Client 0: the one that writes summaries, metrics, exports and host state."""
        return self.index == 0

    @classmethod
    def of(cls, count: int, index: int, jobs: str | Sequence[str]) -> Clients:
        if isinstance(jobs, str):
            jobs = [j.strip() for j in jobs.split(",") if j.strip()]
        return cls(int(count), int(index), tuple(jobs))

    @classmethod
    def current(cls) -> Clients:
        """The set-up in this process's environment (one client when none is set)."""
        count = int(os.environ.get("DTENSOR_NUM_CLIENTS", "1") or 1)
        if count <= 1:
            return cls()
        return cls.of(
            count, int(os.environ.get("DTENSOR_CLIENT_ID", "0")), os.environ.get("DTENSOR_JOBS", "")
        )

    def export(self) -> None:
        """Writes the set-up into DTensor's environment variables (removes them for one client)."""
        if not self.multi:
            for key in _ENV:
                os.environ.pop(key, None)
            return
        os.environ.update(
            DTENSOR_CLIENT_ID=str(self.index),
            DTENSOR_NUM_CLIENTS=str(self.count),
            DTENSOR_JOB_NAME=JOB_NAME,
            DTENSOR_JOBS=",".join(self.jobs),
        )

    def local_devices(self, mesh_devices: int) -> int:
        if mesh_devices % self.count:
            raise ConfigError(
                f"a mesh of {mesh_devices} devices does not split over {self.count} clients: use a mesh whose "
                "size is a multiple of --num-clients"
            )
        return mesh_devices // self.count


def initialize(device_type: str) -> None:
    """Initialises DTensor's accelerator system for the clients in the environment (once per process)."""
    from tensorflow.experimental import dtensor

    if _initialized:
        if _initialized[0] != device_type:
            raise ConfigError(f"DTensor was initialised for {_initialized[0]}, not {device_type}")
        return
    clients = Clients.current()
    _log.info(
        "client %d of %d: joining %s (%s)", clients.index, clients.count, ",".join(clients.jobs), device_type
    )
    dtensor.initialize_accelerator_system(device_type)
    _initialized.append(device_type)


def shutdown() -> None:
    """Shuts DTensor's accelerator system down. TF 2.17 refuses to in multi-client mode (it raises
    "Shutting down accelerator system under multi-client mode is not supported"); the clients' gRPC
    servers then go with their processes, which is what is left to do."""
    from tensorflow.experimental import dtensor

    if not _initialized:
        return
    try:
        dtensor.shutdown_accelerator_system()
    except Exception as e:
        _log.debug("shutdown_accelerator_system: %s (left to process exit)", e)
    _initialized.clear()


def distributed_mesh(dims: Sequence[tuple[str, int]], device_type: str):
    """The global mesh of `dims` over every client's devices (this client holding its share)."""
    from tensorflow.experimental import dtensor

    initialize(device_type)
    mesh = dtensor.create_distributed_mesh(list(dims), device_type=device_type)
    barrier(mesh)
    return mesh


def barrier(mesh) -> None:
    """Returns once every client has reached it (a one-number all-reduce over the mesh)."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    if mesh is None or mesh.num_local_devices() == mesh.size:
        return
    layout = dtensor.Layout([mesh.dim_names[0]], mesh)
    ones = dtensor.pack([tf.ones([1])] * mesh.num_local_devices(), layout)
    total = float(dtensor.unpack(tf.reduce_sum(ones))[0])
    expected = mesh.dim_size(mesh.dim_names[0])
    if round(total) != expected:
        raise RuntimeError(f"barrier: {total:g} of {expected} mesh rows answered")


def _batch_positions(mesh, batch_dim: str) -> list[int]:
    return sorted({loc[batch_dim] for loc in mesh.local_device_locations()})


def place_local(mesh, value, batch_dim: str = "batch"):
    """This client's part of a batch (its rows, in order) placed on the mesh, dimension 0 sharded over
    `batch_dim`: each local device gets the slice of its batch position. No data crosses clients."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    value = tf.convert_to_tensor(value)
    if batch_dim not in mesh.dim_names:
        raise ConfigError(
            f"a batch split over clients needs a {batch_dim!r} mesh dimension; mesh has {mesh.dim_names}"
        )
    positions = _batch_positions(mesh, batch_dim)
    if value.shape[0] % len(positions):
        raise ConfigError(
            f"a client batch of {value.shape[0]} does not split over its {len(positions)} batch positions"
        )
    pieces = tf.split(value, len(positions), axis=0)
    index = {p: i for i, p in enumerate(positions)}
    components = [pieces[index[loc[batch_dim]]] for loc in mesh.local_device_locations()]
    layout = dtensor.Layout([batch_dim] + [dtensor.UNSHARDED] * (value.shape.rank - 1), mesh)
    return dtensor.pack(components, layout)


def gather(mesh, structure, batch_dim: str = "batch"):
    """Every client's host batch, all-gathered along dimension 0 in client order: a nested structure of
    dense eager tensors on the host, the same on every client afterwards (what a reader would yield)."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    def one(value):
        placed = place_local(mesh, value, batch_dim)
        full = dtensor.relayout(placed, dtensor.Layout.replicated(mesh, placed.shape.rank))
        return dtensor.unpack(full)[0]

    for leaf in tf.nest.flatten(structure):
        if isinstance(leaf, tf.RaggedTensor | tf.SparseTensor):
            raise ConfigError("a batch with ragged or sparse tensors cannot be gathered over clients")
    return tf.nest.map_structure(one, structure)


@dataclasses.dataclass(frozen=True)
class Share:
    """The input streams this client reads: ``readers`` of ``count`` (stream r reads files r, r + count, ...
    and contributes ``batch / count`` rows to every global batch, in stream order)."""

    readers: tuple[int, ...]
    count: int

    def files(self, files: Sequence[str], what: str) -> list[list[str]]:
        files = list(files)
        if len(files) < self.count:
            raise ConfigError(
                f"{what}: {len(files)} file(s) cannot be split into {self.count} input streams (one per client "
                f"by default, --input-shards to change): re-run its pipeline with --num-shards >= {self.count}"
            )
        return [files[r :: self.count] for r in self.readers]

    def batch(self, batch_size: int) -> int:
        if batch_size % self.count:
            raise ConfigError(f"--batch-size {batch_size} does not split into {self.count} input streams")
        return batch_size // self.count


def input_share(config=None) -> Share | None:
    """This client's streams of the training input (None: one stream, read whole, as without clients)."""
    clients = Clients.current()
    count = int(getattr(config, "input_shards", 0) or 0) or clients.count
    if count % clients.count:
        raise ConfigError(f"--input-shards {count} must be a multiple of the {clients.count} clients")
    if count == 1:
        return None
    per = count // clients.count
    return Share(tuple(range(clients.index * per, (clients.index + 1) * per)), count)


def seed_of(seed: int | None, reader: int) -> int | None:
    """Stream `reader`'s shuffle seed (the same stream gets the same seed in any client)."""
    return None if seed is None else int(np.uint32(seed * 1_000_003 + reader))
