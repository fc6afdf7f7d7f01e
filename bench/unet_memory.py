"""Benchmark: peak activation memory per device of the partitioned 3D U-Net, against the partition count.

    python bench/unet_memory.py [--shape 64,96,96] [--channels 8] [--depth 3] [--parts 1,2,4,8]
        [--largest 160,192,192 --budget-mb 1024]

For one input shape, one forward + backward pass (the training step without the update) per partition
count P, measured as `headrace train unet3d` measures it: the BFC allocator's peak minus what was in use
before, divided by P (virtual CPU devices share one allocator; on GPUs it would be each device's own).
Prints the per-device peak, its ratio to P=1 beside the ideal 1/P, and voxels/s of a training step.

With --largest, a volume whose unpartitioned step exceeds --budget-mb per device: P=1 is refused (as the
trainer refuses it) and the smallest P in --parts that fits trains two steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
warnings.filterwarnings("ignore")

from headrace.core import mesh as mesh_lib  # noqa: E402

mesh_lib.configure_virtual_devices(9)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from headrace.models import spatial  # noqa: E402
from headrace.models.optim import Adam  # noqa: E402
from headrace.models.unet3d import UNet3D  # noqa: E402
from headrace.runners.train_unet3d import devices, partition_for, peak_bytes  # noqa: E402


def measure(shape, channels, depth, parts, *, steps=3):
    model = UNet3D(channels=channels, levels=depth, seed=0)
    model.check_shape(shape)
    devs = devices(parts)
    part = partition_for(shape[0], parts, model, devs)
    weights = model.weights
    opt = Adam(weights)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(1, *shape, 1)), tf.float32)
    y = tf.constant((rng.uniform(size=(1, *shape)) < 0.1).astype(np.int32))

    @tf.function
    def grads(x, y):
        with tf.GradientTape() as tape:
            loss, _ = model.loss(spatial.scatter(x, part), spatial.scatter(y, part), part)
        return loss, tape.gradient(loss, weights)

    @tf.function
    def step(x, y):
        loss, g = grads(x, y)
        opt.apply(g, weights)
        return loss

    grads(x, y)
    peak = peak_bytes(grads, (x, y), parts, devs)
    seconds = None
    if steps:
        step(x, y)  # trace
        t = time.perf_counter()
        for _ in range(steps):
            float(step(x, y))
        seconds = (time.perf_counter() - t) / steps
    return peak, seconds, part


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="64,96,96")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--parts", default="1,2,4,8")
    parser.add_argument("--largest", default="")
    parser.add_argument("--budget-mb", type=float, default=1024.0)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    parts_list = [int(p) for p in args.parts.split(",")]

    rows = []
    for parts in parts_list:
        peak, seconds, part = measure(shape, args.channels, args.depth, parts)
        rows.append((parts, part.block_sizes, peak, seconds))
        print(f"# P={parts}: {peak / 2**20:.1f} MB per device, {seconds:.2f} s/step", file=sys.stderr)
    base = rows[0][2]
    voxels = int(np.prod(shape))
    print(
        f"\n3D U-Net, input {shape}, {args.channels} channels, {args.depth} levels (one forward + backward)\n"
    )
    print(
        "| partitions | depth per device | peak MB per device | vs P=1 | ideal 1/P | voxels/s (train step) |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for parts, blocks, peak, seconds in rows:
        print(
            f"| {parts} | {'/'.join(map(str, blocks))} | {peak / 2**20:.1f} | {peak / base:.3f} | "
            f"{1 / parts:.3f} | {voxels / seconds:,.0f} |"
        )

    if args.largest:
        big = tuple(int(s) for s in args.largest.split(","))
        budget = args.budget_mb * 2**20
        print(f"\nbudget {args.budget_mb:g} MB per device, volume {big} ({np.prod(big) / 1e6:.1f}M voxels)\n")
        print("| partitions | peak MB per device | within budget | s/step |")
        print("|---:|---:|---|---:|")
        for parts in parts_list:
            peak, _, _ = measure(big, args.channels, args.depth, parts, steps=0)
            fits = peak <= budget
            seconds = measure(big, args.channels, args.depth, parts, steps=2)[1] if fits else None
            print(
                f"| {parts} | {peak / 2**20:.0f} | {'yes, trains' if fits else 'no: refused'} | "
                f"{'' if seconds is None else f'{seconds:.1f}'} |",
                flush=True,
            )
            if fits:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
