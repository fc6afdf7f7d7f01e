"""Benchmark: images/s of the tuned image input pipeline against a naive one, on the same shards.

    python bench/image_input.py [--per-class 60] [--max-side 640] [--image-size 224] [--batches 20] [--repeats 3]

The shards: image-ingest of the photographs installed packages ship (`headrace.pipelines.images_data`:
10 photos, --per-class augmented crops each, longer side 96..--max-side, JPEG and PNG). Each pipeline
is read for --batches batches of 64 after two warm-up batches, --repeats times; the table gives the
median images/s and its ratio to the naive pipeline in the same run:

  naive                decode the whole JPEG, then crop and resize; one thread, no prefetch
  tuned, 1 thread      headrace.transforms.image_input with a one-thread private pool: the crop decoded
                       alone (decode_and_crop_jpeg), uint8 until batching, normalised per batch
  tuned                the same with autotuned parallelism (every core), prefetch
  tuned, bfloat16      ... and bfloat16 batches
  eval (cached)        central crops, second pass over the cached decoded set
  trainer              what the trainer consumes: a ResNet-50 training step (grouped batch norm,
                       momentum SGD) on one device at the same size, images/s of its median step
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

BATCH = 64


def rate(make, batches: int) -> float:
    it = iter(make())
    for _ in range(2):  # warm-up: tracing, the first file reads, autotune's first choices
        next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            break
        n += int(b["label"].shape[0])
    return n / (time.perf_counter() - start)


def trainer_rate(out, size: int, depth: int, steps: int = 3) -> float:
    """Images/s of the median ResNet training step (1 device) on batches of the tuned pipeline."""

    from headrace.models.optim import Momentum
    from headrace.models.resnet import ResNet, ResNetConfig, sgd_step
    from headrace.transforms.image_input import image_dataset

    model = ResNet(ResNetConfig(depth=depth, num_classes=10))
    optimizer = Momentum(model.weights, weight_decay=1e-4, decay_mask=model.decay_mask())

    step = sgd_step(model, optimizer, 0.1, label_smoothing=0.0)

    times = []
    for i, batch in enumerate(image_dataset(str(out), "train", BATCH, image_size=size).take(steps + 1)):
        placed = model.place(batch["image"].numpy(), batch["label"].numpy())
        start = time.perf_counter()
        float(step(*placed))
        if i:
            times.append(time.perf_counter() - start)
    return BATCH / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--max-side", type=int, default=640)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trainer-depth", type=int, default=50)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from headrace.pipelines.images import ImageIngestConfig, build_image_ingest
    from headrace.pipelines.images_data import write_photos
    from headrace.runners.beam_runner import run_pipeline
    from headrace.transforms.image_input import image_dataset, naive_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-images-"))
    try:
        n = write_photos(work / "in", per_class=args.per_class, max_side=args.max_side)
        start = time.perf_counter()
        out = work / "out"
        run_pipeline(
            build_image_ingest,
            ImageIngestConfig(
                input=str(work / "in"), output=str(out), shards=8, max_side=args.max_side, eval_fraction=0.2
            ),
        )
        print(f"image-ingest: {n} images in {time.perf_counter() - start:.1f} s ({os.cpu_count()} cores)")
        size = args.image_size

        def eval_cached():
            ds = image_dataset(str(out), "eval", BATCH, image_size=size, repeat=True)
            return ds

        pipelines = {
            "naive": lambda: naive_dataset(str(out), "train", BATCH, image_size=size).repeat(),
            "tuned, 1 thread": lambda: image_dataset(
                str(out), "train", BATCH, image_size=size, private_threads=1
            ),
            "tuned": lambda: image_dataset(str(out), "train", BATCH, image_size=size),
            "tuned, bfloat16": lambda: image_dataset(
                str(out), "train", BATCH, image_size=size, dtype="bfloat16"
            ),
            "eval (cached)": eval_cached,
        }
        rates: dict[str, list[float]] = {name: [] for name in pipelines}
        for _ in range(args.repeats):  # interleaved, so that the machine's noise falls on every row
            for name, make in pipelines.items():
                rates[name].append(rate(make, args.batches))
        naive = statistics.median(rates["naive"])
        print(
            f"input pipelines: batches of {BATCH} at {size}x{size}, {args.batches} batches, "
            f"median of {args.repeats}"
        )
        print(f"  {'pipeline':<18} {'images/s':>10} {'vs naive':>9}   runs")
        for name, values in rates.items():
            median = statistics.median(values)
            runs = ", ".join(f"{v:,.0f}" for v in values)
            print(f"  {name:<18} {median:>10,.1f} {median / naive:>8.2f}x   {runs}")
        consumed = trainer_rate(out, size, args.trainer_depth)
        tuned = statistics.median(rates["tuned"])
        print(
            f"  {'trainer':<18} {consumed:>10,.1f} {consumed / naive:>8.2f}x   ResNet-{args.trainer_depth}, 1 device"
        )
        print(f"  the tuned pipeline feeds {tuned / consumed:,.0f}x what the trainer consumes here")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
