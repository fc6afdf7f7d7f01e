"""Benchmark: images/s per training step of ResNet-50 on this machine, by device count and batch-norm
group size, through the trainer's own step (grouped batch norm, momentum SGD, moving statistics).

    python bench/resnet.py [--image-size 224] [--batch 32] [--steps 4] [--depth 50] [--skip-steps]

Rows: 1 device (plain TensorFlow), then 2 and 8 virtual CPU devices (`batch=N` meshes) with batch-norm
groups of G = 1, 2 and all replicas; on a machine with GPUs, `--gpu` runs the same rows on them. Each row
times --steps steps after one warm-up step (tracing) and reports the median step's images/s; the
ratio is against the 1-device row of the same run. Virtual devices share this machine's cores, so more
of them cannot be faster here: the rows show what grouping costs, not a speed-up.

Then the gradient reduction (`headrace.core.collectives`): a ResNet-50-sized gradient (25,557,032
floats) held per replica of an ``x=2,y=4`` mesh, summed at once (one all-reduce over 8) or in two
stages (within rows of 4, then across the 2 rows; or columns first), median of 5, with the all-reduces
the profiler's op trace shows DTensor ran for each (traced on 1,000 floats: the same collectives);
then the collectives DTensor placed in the trainer's own step on ``batch=8``, from the same trace.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--gpu", action="store_true", help="run the meshes on the GPUs present")
    parser.add_argument("--skip-steps", action="store_true", help="only the reduction tables")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from headrace.core import mesh as mesh_lib

    if not args.gpu:
        os.environ["HEADRACE_DEVICE_TYPE"] = "CPU"
        mesh_lib.configure_virtual_devices(8)
    import numpy as np

    from headrace.models.optim import Momentum
    from headrace.models.resnet import ResNet, ResNetConfig, sgd_step

    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
    labels = rng.integers(0, 1000, size=args.batch).astype(np.int32)
    config = ResNetConfig(depth=args.depth)

    def run(devices: int, group: int | None) -> float:
        mesh = mesh_lib.create_mesh(f"batch={devices}") if devices > 1 else None
        groups = devices // (group or devices)
        model = ResNet(config, mesh, bn_groups=groups)
        optimizer = Momentum(model.weights, weight_decay=1e-4, decay_mask=model.decay_mask())

        step = sgd_step(model, optimizer, 0.1, label_smoothing=0.1)

        times = []
        for i in range(args.steps + 1):
            placed = model.place(images, labels)
            start = time.perf_counter()
            float(mesh_lib.to_numpy(step(*placed)))
            if i:  # the first step traces and compiles
                times.append(time.perf_counter() - start)
        return args.batch / statistics.median(times)

    if not args.skip_steps:
        steps_table(args, run)
    reduction_table()
    trainer_collectives(config)


def trainer_collectives(config) -> None:
    """What DTensor runs in the trainer's step on batch=8, from the op trace (a width-8 copy of the
    network on 64-pixel images: the same layers, so the same collectives, and a trace the profiler
    keeps whole)."""
    import dataclasses

    import numpy as np

    from headrace.core import mesh as mesh_lib
    from headrace.core.collectives import count_collectives
    from headrace.models.optim import Momentum
    from headrace.models.resnet import ResNet, sgd_step

    small = dataclasses.replace(config, width=8)
    rng = np.random.default_rng(2)
    images = rng.normal(size=(16, 64, 64, 3)).astype(np.float32)
    labels = rng.integers(0, small.num_classes, size=16).astype(np.int32)
    print(f"the trainer's step on batch=8 (ResNet-{small.depth}), collectives per device from the op trace:")
    for group in (8, 2, 1):
        model = ResNet(small, mesh_lib.create_mesh("batch=8"), bn_groups=8 // group)
        optimizer = Momentum(model.weights, weight_decay=1e-4, decay_mask=model.decay_mask())

        step = sgd_step(model, optimizer, 0.1, label_smoothing=0.0)

        trace = count_collectives(step, *model.place(images, labels), devices=8)
        print(
            f"  BN groups of {group}: {trace['per_device']} all-reduces per device per step "
            f"({len(model.weights)} weight tensors, {len(model.batch_norms)} batch norms)"
        )


def reduction_table() -> None:
    import numpy as np
    import tensorflow as tf

    from headrace.core import mesh as mesh_lib
    from headrace.core.collectives import count_collectives, per_replica, reduce_flat, reduce_two_stage

    n = 25_557_032
    mesh = mesh_lib.create_mesh("x=2,y=4")
    values = np.random.default_rng(1).normal(size=(2, 4, n)).astype(np.float32)
    placed = per_replica(mesh, values)
    small = per_replica(mesh, values[:, :, :1000].copy())
    arrangements = {
        "flat: one all-reduce over 8": tf.function(reduce_flat),
        "rows of 4, then across 2": tf.function(lambda t: reduce_two_stage(t, 1)),
        "columns of 2, then across 4": tf.function(lambda t: reduce_two_stage(t, 0)),
    }
    reference = values.sum(axis=(0, 1), dtype=np.float64)
    print(f"gradient reduction: {n:,} floats per replica on x=2,y=4, median of 5")
    print(f"  {'arrangement':<30} {'ms':>8} {'vs flat':>8} {'all-reduces':>12} {'max |err|':>10}")
    base = None
    for name, fn in arrangements.items():
        out = mesh_lib.to_numpy(fn(placed))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            mesh_lib.to_numpy(fn(placed))
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1000
        base = base or ms
        trace = count_collectives(fn, small, devices=8)  # the same collectives on 1,000 floats
        err = float(np.abs(out - reference).max())
        print(f"  {name:<30} {ms:>8.1f} {ms / base:>7.2f}x {trace['per_device']:>12} {err:>10.2e}")


def steps_table(args, run) -> None:
    rows = [("1 (plain TF)", 1, None)]
    for devices in (2, 8):
        for group in (1, 2, None):
            if group is None or group < devices:
                rows.append((f"{devices}, G={'all' if group is None else group}", devices, group))
    print(
        f"ResNet-{args.depth}, batch {args.batch} at {args.image_size}x{args.image_size}, median of "
        f"{args.steps} steps, {os.cpu_count()} cores, {'GPUs' if args.gpu else 'virtual CPU devices'}"
    )
    print(f"  {'devices, BN group':<18} {'images/s':>9} {'step s':>8} {'vs 1 device':>12}")
    base = None
    for name, devices, group in rows:
        rate = run(devices, group)
        base = base or rate
        print(f"  {name:<18} {rate:>9.2f} {args.batch / rate:>8.2f} {rate / base:>11.2f}x")


if __name__ == "__main__":
    main()
