"""Reductions over a 2-D mesh of replicas, and what DTensor runs for them (an op trace).

The pod-scale ResNet paper reduces gradients over a 2-D torus in two phases, along one mesh dimension
and then the other, rather than over all replicas at once. Under DTensor the collective is chosen by the
SPMD expansion from the layouts: a value held per replica of a ``x=a,y=b`` mesh is a tensor [a, b, ...]
laid out ("x", "y", ...), and

* `reduce_flat` sums dimensions 0 and 1 together: one all-reduce over all a * b replicas;
* `reduce_two_stage` sums one dimension, then the other: an all-reduce within each row (or column) of
  the mesh, then one across them.

Both give the same sum (to float rounding, tested). `count_collectives` runs a function under
TensorFlow's profiler and counts the collective kernels the devices executed, which is how the tests
and ``bench/resnet.py`` show what DTensor ran, for these reductions and for the trainer's step.
"""

from __future__ import annotations

import glob
import tempfile
from collections.abc import Callable

import numpy as np

__all__ = ["count_collectives", "per_replica", "reduce_flat", "reduce_two_stage"]

# Calls traced: the profiler may miss an event at the edges of its window, so the count per call is the
# rounded mean over several.
REPEATS = 4


def per_replica(mesh, values: np.ndarray):
    """`values` [a, b, ...] placed so that replica (i, j) of the ``x=a,y=b`` mesh holds ``values[i, j]``."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    x, y = mesh.dim_names
    rank = values.ndim
    layout = dtensor.Layout([x, y] + [dtensor.UNSHARDED] * (rank - 2), mesh)
    parts = [
        tf.constant(values[loc[x] : loc[x] + 1, loc[y] : loc[y] + 1]) for loc in mesh.local_device_locations()
    ]
    return dtensor.pack(parts, layout)


def reduce_flat(stacked):
    """The sum over all replicas at once: one all-reduce over both mesh dimensions."""
    import tensorflow as tf

    return tf.reduce_sum(stacked, axis=[0, 1])


def reduce_two_stage(stacked, first: int = 1):
    """The sum along mesh dimension `first` (1: within each row), then along the other."""
    import tensorflow as tf

    return tf.reduce_sum(tf.reduce_sum(stacked, axis=first), axis=0)


def count_collectives(fn: Callable, *args, devices: int) -> dict[str, int]:
    """Runs ``fn(*args)`` under the profiler (after a warm-up call, waiting for every result) and
    counts the collective kernels executed per call: ``collective_ops`` (summed over the `devices`)
    and ``per_device`` (collectives each device ran: all-reduces, gathers and all-to-alls)."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from headrace.core.mesh import to_numpy

    def call():  # waits for the result: an unfinished step would be cut off by the trace's end
        for t in tf.nest.flatten(fn(*args)):
            to_numpy(t)

    call()  # tracing and SPMD expansion out of the trace
    with tempfile.TemporaryDirectory(prefix="headrace-trace-") as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            for _ in range(REPEATS):
                call()
        finally:
            tf.profiler.experimental.stop()
        (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    kernels = named = 0
    for plane in space.planes:
        names = plane.event_metadata
        for line in plane.lines:
            for event in line.events:
                name = names[event.metadata_id].name
                if name == "CollectiveOpV2Kernel::Run":
                    kernels += 1
                elif name.endswith((":CollectiveReduceV2", ":CollectiveGatherV2", ":CollectiveAllToAllV2")):
                    named += 1
    # Two records of each collective run; the profiler can drop a few events, so the larger count.
    runs = round(max(kernels, named) / REPEATS)
    return {"collective_ops": runs, "per_device": round(runs / devices)}
