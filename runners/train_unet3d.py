"""``headrace train unet3d`` and ``headrace predict unet3d``: a 3D U-Net on ct-ingest output, spatially
partitioned across devices (`headrace.models.spatial`).

    headrace train unet3d --data OUT --output M [--partitions P] [--steps N] [--seed S] [--patch D,H,W]
        [--channels C] [--depth L] [--mesh space=P] [--memory-budget-mb MB]
    headrace predict unet3d --model M --input OUT --output PRED [--overlap 0.5]

Training reads labelled volumes of ``OUT`` (volumes without a label are skipped and counted), holds out
some by a hash of their id, and trains on random patches (half of them centred on foreground) or, with
``--patch none``, on whole volumes padded to a multiple of 2^(L-1). Each patch is cut along depth into P
blocks on P devices (GPUs when present, else virtual CPU devices). Held-out volumes are segmented by a
sliding window of the patch size (overlapping windows averaged) and scored by Dice.

Outputs in ``M``: ``metrics.json`` (``loss_history``, ``dice``, ``peak_bytes_per_device``,
``voxels_per_sec``, counts), ``saved_model/`` (``serving_default``: ``volume`` [B, pd, ph, pw, 1] ->
``probability`` [B, pd, ph, pw] of foreground; `sliding_window` covers larger volumes), TensorBoard
summaries, ``curves.png`` and ``predictions.png`` (a held-out slice with truth and prediction).

Memory: ``peak_bytes_per_device`` is measured on one forward and backward pass of the training shape with
the input pipeline idle: the peak of TensorFlow's allocator minus what was in use before. Virtual CPU devices
share one allocator, so there it is that peak divided by P (blocks are equal to a 2^(L-1) slice); on GPUs
it is the largest per-device peak. With ``--memory-budget-mb`` a run whose per-device peak exceeds the
budget stops before training and says how many partitions would fit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from headrace.runners import config as config_lib
from headrace.runners.errors import ConfigError, InputError

__all__ = ["UNet3DPredictConfig", "UNet3DTrainConfig", "predict", "sliding_window", "train_and_evaluate"]

_log = logging.getLogger("headrace.train.unet3d")

# TensorFlow's default CPU allocator does not track the peak of multi-device functions; its BFC allocator
# does. Effective only when set before TensorFlow starts (the CLI imports this module first).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")


@dataclasses.dataclass(frozen=True)
class UNet3DTrainConfig:
    data: str = dataclasses.field(default="", metadata={"help": "a ct-ingest output folder"})
    output: str = ""
    partitions: int = dataclasses.field(default=1, metadata={"help": "blocks along depth, one per device"})
    slabs: int = dataclasses.field(
        default=0,
        metadata={"help": "depth slabs computed (a multiple of --partitions; 0 = up to 8, independent of P)"},
    )
    steps: int = 200
    seed: int = 0
    patch: tuple[int, int, int] | None = dataclasses.field(
        default=(32, 64, 64), metadata={"help": "D,H,W of training patches; none = whole volumes"}
    )
    channels: int = 8
    depth: int = dataclasses.field(default=3, metadata={"help": "U-Net levels (resolutions)"})
    mesh: str = dataclasses.field(default="", metadata={"help": "space=P (same as --partitions P)"})
    learning_rate: float = 1e-3
    foreground_fraction: float = 0.5
    patches_per_volume: int = 4
    eval_fraction: float = 0.25
    overlap: float = 0.5
    memory_budget_mb: float = dataclasses.field(
        default=0.0, metadata={"help": "refuse to train when a device would need more (0 = no budget)"}
    )
    log_every_seconds: float = 10.0


@dataclasses.dataclass(frozen=True)
class UNet3DPredictConfig:
    model: str = dataclasses.field(default="", metadata={"help": "a `train unet3d` output folder"})
    input: str = dataclasses.field(default="", metadata={"help": "a ct-ingest output folder"})
    output: str = ""
    overlap: float = 0.5
    partitions: int = 1


@config_lib.register("unet3d", command="train unet3d")
def unet3d() -> UNet3DTrainConfig:
    """3-level U-Net, 8 channels, 32x64x64 patches, 200 steps, unpartitioned."""
    return UNet3DTrainConfig()


@config_lib.register("unet3d-partitioned", command="train unet3d")
def unet3d_partitioned() -> UNet3DTrainConfig:
    """As unet3d, each patch split into 4 blocks along depth on 4 devices."""
    return UNet3DTrainConfig(partitions=4)


@config_lib.register("unet3d-predict", command="predict unet3d")
def unet3d_predict() -> UNet3DPredictConfig:
    """Sliding-window segmentation of every volume of a ct-ingest output."""
    return UNet3DPredictConfig()


# -------------------------------------------------------------------------------------------------


def _partitions(config: UNet3DTrainConfig) -> int:
    if not config.mesh:
        return config.partitions
    from headrace.runners import mesh as mesh_lib

    dims = dict(mesh_lib.parse_mesh(config.mesh))
    unknown = set(dims) - {"space"}
    if unknown:
        raise ConfigError(
            f"--mesh {config.mesh!r}: unet3d partitions space only (space=P), not {sorted(unknown)}"
        )
    if config.partitions not in (1, dims["space"]):
        raise ConfigError(f"--mesh space={dims['space']} and --partitions {config.partitions} disagree")
    return dims["space"]


def _slabs(requested: int, units: int, parts: int) -> int:
    """``--slabs 0``: the most slabs up to 8 the depth allows that P divides, the same for every P that
    divides it, so runs on 1, 2, 4 or 8 devices compute the same numbers."""
    if requested:
        return requested
    for s in range(min(8, units), 0, -1):
        if s % parts == 0:
            return s
    return parts  # P > 8 or a thin volume: Partition.even explains what does not fit


def partition_for(depth: int, parts: int, model, devs: Sequence[str], *, slabs: int = 0):
    """The partition the trainer uses for an input of `depth` slices (see `_slabs`)."""
    from headrace.models.spatial import Partition

    return Partition.even(
        depth, parts, devs, multiple=model.multiple, slabs=_slabs(slabs, depth // model.multiple, parts)
    )


def devices(n: int) -> list[str]:
    """The devices the blocks go to: GPUs when there are at least n; else logical CPU devices 1..n, the
    first one keeping the weights, the optimizer and the cross-block sums.

    On CPU that separation is what makes P=1 and P=4 compute the same numbers: oneDNN rewrites a
    function whose ops all sit on one device differently from a multi-device one (measured: identical
    weights gave gradients 1e-4 apart on the third step when P=1 ran on the weights' own device, and
    bitwise-identical ones for 20 steps once every block ran apart from them).
    """
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if len(gpus) >= n:
        return gpus
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(cpus) < n + 1:
        raise ConfigError(
            f"--partitions {n}: {len(cpus)} CPU devices, {n + 1} needed (one per block plus the host); the CLI "
            "splits the CPU so (in Python, call headrace.runners.mesh.configure_virtual_devices(P + 1) "
            "before TensorFlow starts)"
        )
    return cpus[1 : n + 1]


def read_manifest(data: str) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """(ids of labelled volumes, ids of unlabelled ones, shape of every volume) from
    ``DATA/manifest.jsonl``."""
    path = Path(data) / "manifest.jsonl"
    if not path.is_file():
        raise InputError(f"--data {data}: no manifest.jsonl (is it a ct-ingest output?)")
    labelled, unlabelled, shapes = [], [], {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry["status"] != "ok":
            continue
        (labelled if entry.get("label") else unlabelled).append(entry["id"])
        shapes[entry["id"]] = entry["shape"]
    return sorted(labelled), sorted(unlabelled), shapes


def split_ids(ids: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held out) by a hash of the id; at least one of each when there are two or more."""

    def h(i: str) -> float:
        return int.from_bytes(hashlib.sha1(i.encode()).digest()[:4], "big") / 2**32

    held = [i for i in ids if h(i) < eval_fraction]
    train = [i for i in ids if h(i) >= eval_fraction]
    if len(ids) >= 2 and eval_fraction > 0:
        if not held:
            held, train = [train[0]], train[1:]
        if not train:
            train, held = [held[0]], held[1:]
    return train, held


def _pad_to(volume: np.ndarray, shape: Sequence[int], value: float) -> np.ndarray:
    pads = [(0, max(0, s - n)) for n, s in zip(volume.shape, shape)]
    return np.pad(volume, pads, constant_values=value) if any(p for _, p in pads) else volume


def sliding_window(
    volume: np.ndarray,
    predict_fn: Callable[[np.ndarray], np.ndarray],
    patch: Sequence[int],
    overlap: float = 0.5,
) -> np.ndarray:
    """Foreground probability [D, H, W] of a volume of any size from a patch predictor.

    Windows of `patch` step by ``patch * (1 - overlap)`` (the last one flush with the end); probabilities
    of overlapping windows are averaged. Volumes smaller than a window are padded with their minimum.
    `predict_fn` maps [1, pd, ph, pw, 1] float32 to [1, pd, ph, pw] probabilities.
    """
    shape = volume.shape
    padded = _pad_to(volume, [max(n, p) for n, p in zip(shape, patch)], float(volume.min()))
    total = np.zeros(padded.shape, np.float32)
    count = np.zeros(padded.shape, np.float32)
    starts = []
    for n, p in zip(padded.shape, patch):
        step = max(1, int(p * (1 - overlap)))
        axis = list(range(0, n - p + 1, step))
        if axis[-1] != n - p:
            axis.append(n - p)
        starts.append(axis)
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                window = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
                prob = predict_fn(padded[window][None, ..., None].astype(np.float32))
                total[window] += np.asarray(prob)[0]
                count[window] += 1.0
    return (total / count)[: shape[0], : shape[1], : shape[2]]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred.astype(bool), truth.astype(bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom)


def _export(model, patch: Sequence[int]):
    """What the SavedModel holds: the weights and the patch forward on one device; (module, serve)."""
    import tensorflow as tf

    from headrace.models import spatial
    from headrace.models.spatial import Partition

    module = tf.Module()
    module.model = model
    whole = Partition(sizes=(int(patch[0]),), devices=("",))  # no device pin: runs where it is loaded

    @tf.function(input_signature=[tf.TensorSpec([None, *patch, 1], tf.float32, name="volume")])
    def serve(volume):
        logits = spatial.gather(model.logits([volume], whole))
        return {"probability": tf.nn.softmax(logits)[..., 1]}

    module.serve = serve
    return module, serve


def _peak_bytes(step_fn, inputs, n_devices: int, devs: Sequence[str]) -> int | None:
    """The per-device peak of one call of `step_fn` (see the module docstring for the method)."""
    import tensorflow as tf

    gpus = [d for d in devs[:n_devices] if "GPU" in d]
    targets = gpus or [devs[0]]
    base = {}
    for d in targets:
        tf.config.experimental.reset_memory_stats(d)
        base[d] = tf.config.experimental.get_memory_info(d)["current"]
    out = step_fn(*inputs)
    _ = [np.asarray(o) for o in tf.nest.flatten(out)]
    peaks = [tf.config.experimental.get_memory_info(d)["peak"] - base[d] for d in targets]
    peak = int(max(peaks)) if gpus else int(peaks[0] / n_devices)
    if peak <= 0:
        _log.warning(
            "unet3d: the allocator reports no peak; set TF_CPU_ALLOCATOR_USE_BFC=true before TensorFlow starts"
        )
        return None
    return peak


def train_and_evaluate(config: UNet3DTrainConfig) -> dict:
    import tensorflow as tf

    from headrace.models import spatial
    from headrace.models.unet3d import UNet3D
    from headrace.pipelines.ct import patch_dataset, volume_dataset
    from headrace.runners.training import Adam, Progress, Summaries, plot_curves, write_json

    if not config.data:
        raise ConfigError("--data is required")
    parts = _partitions(config)
    if config.steps < 1 or config.channels < 1 or config.depth < 1:
        raise ConfigError("--steps, --channels and --depth must be >= 1")
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.dump(config, out / "resolved_config.json")
    labelled, unlabelled, shapes = read_manifest(config.data)
    if not labelled:
        raise InputError(f"--data {config.data}: no labelled volumes ({len(unlabelled)} unlabelled, skipped)")
    train_ids, held_ids = split_ids(labelled, config.eval_fraction)
    eval_on_train = not held_ids
    if eval_on_train:
        held_ids = train_ids
    if unlabelled:
        _log.info("unet3d: %d volumes without a label skipped", len(unlabelled))

    model = UNet3D(channels=config.channels, levels=config.depth, seed=config.seed)
    devs = devices(parts)
    tf.random.set_seed(config.seed)

    if config.patch is not None:
        patch = tuple(int(p) for p in config.patch)
        model.check_shape(patch)
        ds = patch_dataset(
            config.data,
            patch,
            patches_per_volume=config.patches_per_volume,
            foreground_fraction=config.foreground_fraction,
            seed=config.seed,
            ids=train_ids,
            repeat=True,
        ).map(lambda p: (p["volume"], p["label"]))
    else:
        m = model.multiple
        patch = tuple(int(math.ceil(max(shapes[i][a] for i in train_ids) / m) * m) for a in range(3))

        def pad(v):
            vol, lab = v["volume"], v["label"]
            paddings = tf.stack([tf.zeros(3, tf.int64), tf.constant(patch, tf.int64) - v["shape"]], axis=1)
            return (
                tf.ensure_shape(tf.pad(vol, paddings, constant_values=tf.reduce_min(vol)), patch),
                tf.ensure_shape(tf.pad(lab, paddings), patch),
            )

        ds = volume_dataset(config.data, ids=train_ids, shuffle=True, seed=config.seed, repeat=True).map(pad)
    partition = partition_for(patch[0], parts, model, devs, slabs=config.slabs)
    ds = ds.map(lambda v, y: (v[None, ..., None], tf.cast(y[None], tf.int32))).prefetch(2)

    opt = Adam(model.weights, learning_rate=config.learning_rate)
    weights = model.weights

    @tf.function(reduce_retracing=True)
    def grads_fn(x, y):
        with tf.GradientTape() as tape:
            loss, dsc = model.loss(spatial.scatter(x, partition), spatial.scatter(y, partition), partition)
        return loss, dsc, tape.gradient(loss, weights)

    @tf.function(reduce_retracing=True)
    def train_step(x, y):
        loss, dsc, grads = grads_fn(x, y)
        opt.apply(grads, weights)
        return loss, dsc

    zeros_x = tf.zeros([1, *patch, 1], tf.float32)
    zeros_y = tf.zeros([1, *patch], tf.int32)
    grads_fn(zeros_x, zeros_y)  # trace once, so the measurement below is of execution only
    peak = _peak_bytes(grads_fn, (zeros_x, zeros_y), parts, devs)
    budget = config.memory_budget_mb * 2**20
    if budget and peak is not None and peak > budget:
        fit = max(1, math.ceil(peak * parts / budget))
        raise ConfigError(
            f"a {patch} volume needs {peak / 2**20:.0f} MB per device with --partitions {parts}, over "
            f"--memory-budget-mb {config.memory_budget_mb:g}: use --partitions {fit} or more"
        )
    _log.info(
        "unet3d: %d train / %d held-out labelled volumes (%d unlabelled skipped), patch %s, partitions %s "
        "on %s, peak %.1f MB per device",
        len(train_ids),
        len(held_ids),
        len(unlabelled),
        patch,
        partition.sizes,
        [d.rsplit("/", 1)[-1] for d in dict.fromkeys(partition.devices)],
        (peak or 0) / 2**20,
    )

    summaries = Summaries(out / "tensorboard")
    progress = Progress(config.steps, 1, config.log_every_seconds, name="unet3d")
    loss_history, dice_history = [], []
    voxels = math.prod(patch)
    seconds = 0.0
    for step, (x, y) in enumerate(ds.take(config.steps), start=1):
        t = time.perf_counter()
        loss, dsc = train_step(x, y)
        loss = float(loss)
        if step > 1:  # the first step includes tracing
            seconds += time.perf_counter() - t
        loss_history.append(loss)
        dice_history.append(float(dsc))
        summaries.scalars(step, {"loss": loss, "soft_dice": float(dsc)})
        progress.update(step, {"loss": loss, "soft_dice": float(dsc)}, force=step == config.steps)
    if len(loss_history) < config.steps:
        raise InputError(f"--data {config.data}: the input ended after {len(loss_history)} steps")

    # Export, then evaluate through the exported patch forward (what `predict` uses).
    module, serve = _export(model, patch)
    tf.saved_model.save(module, str(out / "saved_model"), signatures={"serving_default": serve})

    def predict_fn(window):
        return serve(tf.constant(window))["probability"].numpy()

    scores, example = {}, None
    for v in volume_dataset(config.data, ids=held_ids):
        prob = sliding_window(v["volume"].numpy(), predict_fn, patch, config.overlap)
        truth = v["label"].numpy()
        scores[v["id"].numpy().decode()] = dice(prob > 0.5, truth)
        if example is None:
            example = (v["volume"].numpy(), truth, prob)
    summaries.scalars(config.steps, {"eval_dice": float(np.mean(list(scores.values())))})
    summaries.close()

    steps = list(range(1, len(loss_history) + 1))
    plot_curves(
        out / "curves.png",
        {"loss (CE + 1 - Dice)": (steps, loss_history), "soft Dice (train patch)": (steps, dice_history)},
        f"unet3d, partitions={parts}, patch {patch}",
    )
    if example is not None:
        _plot_prediction(out / "predictions.png", *example)
    metrics = {
        "loss_history": loss_history,
        "loss_first": loss_history[0],
        "loss_last": loss_history[-1],
        "dice": float(np.mean(list(scores.values()))),
        "dice_per_volume": scores,
        "eval_on_train_volumes": eval_on_train,
        "train_volumes": len(train_ids),
        "held_out_volumes": len(held_ids),
        "unlabelled_skipped": len(unlabelled),
        "peak_bytes_per_device": peak,
        "voxels_per_sec": voxels * (len(loss_history) - 1) / seconds if seconds else None,
        "partitions": parts,
        "block_depths": list(partition.block_sizes),
        "slabs": len(partition.sizes),
        "devices": list(dict.fromkeys(partition.devices)),
        "patch": list(patch),
        "steps": len(loss_history),
    }
    write_json(out / "metrics.json", metrics)
    return {k: v for k, v in metrics.items() if k not in ("loss_history", "dice_per_volume")}


def _plot_prediction(path: Path, volume: np.ndarray, truth: np.ndarray, prob: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = int(np.argmax(truth.sum(axis=(1, 2)))) if truth.any() else volume.shape[0] // 2
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    axes[0].imshow(volume[k], cmap="gray")
    axes[0].set_title(f"slice {k}")
    axes[1].imshow(volume[k], cmap="gray")
    axes[1].imshow(np.ma.masked_equal(truth[k], 0), cmap="autumn", alpha=0.5)
    axes[1].set_title("truth")
    axes[2].imshow(volume[k], cmap="gray")
    axes[2].imshow(np.ma.masked_less(prob[k], 0.5), cmap="winter", alpha=0.5, vmin=0, vmax=1)
    axes[2].set_title(f"prediction (Dice {dice(prob > 0.5, truth):.3f})")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def predict(config: UNet3DPredictConfig) -> dict:
    """Segments every volume of a ct-ingest output with a trained model's SavedModel."""
    import tensorflow as tf

    from headrace.pipelines.ct import VOLUME_SPEC, volume_dataset, write_preview
    from headrace.transforms.tfrecord import example_chunks, write_record_chunks

    if not config.model or not config.input:
        raise ConfigError("--model and --input are required")
    saved = Path(config.model) / "saved_model"
    if not saved.is_dir():
        raise InputError(f"--model {config.model}: no saved_model/ (is it a `train unet3d` output?)")
    metrics = json.loads((Path(config.model) / "metrics.json").read_text())
    patch = tuple(metrics["patch"])
    loaded = tf.saved_model.load(str(saved))
    serve = loaded.signatures["serving_default"]

    def predict_fn(window):
        return serve(volume=tf.constant(window))["probability"].numpy()

    out = Path(config.output)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "previews").mkdir(parents=True)
    results = {}
    with open(tmp / "volumes-00000-of-00001.tfrecord", "wb") as f:  # laid out as ct-ingest output
        for v in volume_dataset(config.input):
            id_ = v["id"].numpy().decode()
            volume = v["volume"].numpy()
            prob = sliding_window(volume, predict_fn, patch, config.overlap)
            mask = (prob > 0.5).astype(np.uint8)
            spacing = v["spacing"].numpy()
            record = {"id": id_.encode(), "volume": prob, "shape": list(prob.shape), "spacing": list(spacing)}
            write_record_chunks(f, example_chunks(VOLUME_SPEC, {**record, "label": mask}))
            write_preview(
                str(tmp / "previews" / f"{id_}.png"), volume, mask, tuple(spacing), f"{id_} predicted"
            )
            entry = {"shape": list(prob.shape), "foreground_voxels": int(mask.sum())}
            if bool(v["has_label"]):
                entry["dice"] = dice(mask, v["label"].numpy())
            results[id_] = entry
    report = {"volumes": len(results), "per_volume": results}
    scored = [r["dice"] for r in results.values() if "dice" in r]
    if scored:
        report["mean_dice"] = float(np.mean(scored))
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {k: v for k, v in report.items() if k != "per_volume"}
