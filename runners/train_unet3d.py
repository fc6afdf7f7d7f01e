"""``headrace train unet3d``: a 3D U-Net on ct-ingest output, spatially partitioned across devices
(`headrace.models.spatial`); ``headrace predict unet3d`` (`headrace.runners.predict_unet3d`) segments
volumes with the SavedModel it exports.

    headrace train unet3d --data OUT --output M [--partitions P] [--steps N] [--seed S] [--patch D,H,W]
        [--channels C] [--depth L] [--mesh space=P] [--memory-budget-mb MB] [--resume]

Training reads labelled volumes of ``OUT`` (volumes without a label are skipped and counted), holds out
some by a hash of their id, and trains on random patches (half of them centred on foreground) or, with
``--patch none``, on whole volumes padded to a multiple of 2^(L-1). Each patch is cut along depth into P
blocks on P devices (GPUs when present, else virtual CPU devices). Held-out volumes are segmented by a
sliding window of the patch size (overlapping windows averaged) and scored by Dice.

Outputs in ``M``: ``metrics.json`` (``loss_history``, ``dice``, ``peak_bytes_per_device``,
``voxels_per_sec``, counts), ``saved_model/`` (``serving_default``: ``volume`` [B, pd, ph, pw, 1] ->
``probability`` [B, pd, ph, pw] of foreground; `sliding_window` covers larger volumes), TensorBoard
summaries, a checkpoint, ``curves.png`` and ``predictions.png`` (a held-out slice with truth and
prediction).

Memory: ``peak_bytes_per_device`` is measured on one forward and backward pass of the training shape with
the input pipeline idle: the peak of TensorFlow's allocator minus what was in use before. Virtual CPU devices
share one allocator, so there it is that peak divided by P (blocks are equal to a 2^(L-1) slice); on GPUs
it is the largest per-device peak. With ``--memory-budget-mb`` a run whose per-device peak exceeds the
budget stops before training and says how many partitions would fit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from headrace.core import config as config_lib
from headrace.core import mesh as mesh_lib
from headrace.core.errors import ConfigError, InputError
from headrace.runners import loop

__all__ = [
    "UNet3DTask",
    "UNet3DTrainConfig",
    "devices",
    "partition_for",
    "peak_bytes",
    "split_ids",
    "train_and_evaluate",
]

_log = logging.getLogger("headrace.train.unet3d")

# TensorFlow's default CPU allocator does not track the peak of multi-device functions; its BFC allocator
# does. Effective only when set before TensorFlow starts (the CLI imports this module first).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")


@dataclasses.dataclass(frozen=True)
class UNet3DTrainConfig(loop.TrainConfig):
    data: str = dataclasses.field(default="", metadata={"help": "a ct-ingest output folder"})
    mesh: str = dataclasses.field(default="", metadata={"help": "space=P (same as --partitions P)"})
    partitions: int = dataclasses.field(default=1, metadata={"help": "blocks along depth, one per device"})
    slabs: int = dataclasses.field(
        default=0,
        metadata={"help": "depth slabs computed (a multiple of --partitions; 0 = up to 8, independent of P)"},
    )
    steps: int = 200
    patch: tuple[int, int, int] | None = dataclasses.field(
        default=(32, 64, 64), metadata={"help": "D,H,W of training patches; none = whole volumes"}
    )
    channels: int = 8
    depth: int = dataclasses.field(default=3, metadata={"help": "U-Net levels (resolutions)"})
    learning_rate: float = 1e-3
    foreground_fraction: float = 0.5
    patches_per_volume: int = 4
    eval_fraction: float = 0.25
    overlap: float = 0.5
    memory_budget_mb: float = dataclasses.field(
        default=0.0, metadata={"help": "refuse to train when a device would need more (0 = no budget)"}
    )
    export: bool = True


@config_lib.register("unet3d", command="train unet3d")
def unet3d() -> UNet3DTrainConfig:
    """3-level U-Net, 8 channels, 32x64x64 patches, 200 steps, unpartitioned."""
    return UNet3DTrainConfig()


@config_lib.register("unet3d-partitioned", command="train unet3d")
def unet3d_partitioned() -> UNet3DTrainConfig:
    """As unet3d, each patch split into 4 blocks along depth on 4 devices."""
    return UNet3DTrainConfig(partitions=4)


# -------------------------------------------------------------------------------------------------
# Devices, partitions, memory
# -------------------------------------------------------------------------------------------------


def _partitions(config: UNet3DTrainConfig) -> int:
    if not config.mesh:
        return config.partitions
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
            "splits the CPU so (in Python, call headrace.core.mesh.configure_virtual_devices(P + 1) "
            "before TensorFlow starts)"
        )
    return cpus[1 : n + 1]


def peak_bytes(step_fn, inputs, n_devices: int, devs: Sequence[str]) -> int | None:
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


def split_ids(ids: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held out) by a hash of the id; at least one of each when there are two or more, and the
    only one trained on when there is one."""

    def h(i: str) -> float:
        return int.from_bytes(hashlib.sha1(i.encode()).digest()[:4], "big") / 2**32

    if len(ids) == 1:
        return list(ids), []
    held = [i for i in ids if h(i) < eval_fraction]
    train = [i for i in ids if h(i) >= eval_fraction]
    if len(ids) >= 2 and eval_fraction > 0:
        if not held:
            held, train = [train[0]], train[1:]
        if not train:
            train, held = [held[0]], held[1:]
    return train, held


def _serving(model, patch: Sequence[int]):
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


# -------------------------------------------------------------------------------------------------
# The task
# -------------------------------------------------------------------------------------------------


class UNet3DTask(loop.Task):
    name = "unet3d"
    loss_window = 1

    def __init__(self, config: UNet3DTrainConfig):
        super().__init__(config)
        from headrace.pipelines import ct

        self.parts = _partitions(config)
        labelled, self.unlabelled, self.shapes = ct.read_manifest(config.data)
        if not labelled:
            raise InputError(
                f"--data {config.data}: no labelled volumes ({len(self.unlabelled)} unlabelled, skipped)"
            )
        self.train_ids, self.held_ids = split_ids(labelled, config.eval_fraction)
        self.eval_on_train = not self.held_ids
        if self.eval_on_train:
            _log.warning(
                "unet3d: %d labelled volume(s), all used for training: no held-out Dice can be computed "
                "(metrics.json gives the Dice on the training volumes as train_dice)",
                len(self.train_ids),
            )
            self.held_ids = self.train_ids
        if self.unlabelled:
            _log.info("unet3d: %d volumes without a label skipped", len(self.unlabelled))

    def create_mesh(self):
        return None  # blocks are placed on devices by the partition, not by a DTensor layout

    def build(self, mesh) -> None:
        import tensorflow as tf

        from headrace.models import spatial
        from headrace.models.optim import Adam
        from headrace.models.unet3d import UNet3D

        c = self.config
        self.model = model = UNet3D(channels=c.channels, levels=c.depth, seed=c.seed)
        self.devices = devices(self.parts)
        tf.random.set_seed(c.seed)
        if c.patch is not None:
            self.patch = tuple(int(p) for p in c.patch)
            model.check_shape(self.patch)
        else:
            m = model.multiple
            self.patch = tuple(
                int(math.ceil(max(self.shapes[i][a] for i in self.train_ids) / m) * m) for a in range(3)
            )
        self.partition = partition = partition_for(
            self.patch[0], self.parts, model, self.devices, slabs=c.slabs
        )
        self.optimizer = Adam(model.weights, learning_rate=c.learning_rate)

        @tf.function(reduce_retracing=True)
        def grads(x, y):
            with tf.GradientTape() as tape:
                loss, dsc = model.loss(
                    spatial.scatter(x, partition), spatial.scatter(y, partition), partition
                )
            return loss, dsc, tape.gradient(loss, model.weights)

        self._grads = grads
        zeros = (tf.zeros([1, *self.patch, 1], tf.float32), tf.zeros([1, *self.patch], tf.int32))
        grads(*zeros)  # trace once, so the measurement below is of execution only
        self.peak = peak_bytes(grads, zeros, self.parts, self.devices)
        budget = c.memory_budget_mb * 2**20
        if budget and self.peak is not None and self.peak > budget:
            fit = max(1, math.ceil(self.peak * self.parts / budget))
            raise ConfigError(
                f"a {self.patch} volume needs {self.peak / 2**20:.0f} MB per device with --partitions "
                f"{self.parts}, over --memory-budget-mb {c.memory_budget_mb:g}: use --partitions {fit} or more"
            )
        _log.info(
            "unet3d: %d train / %d held-out labelled volumes (%d unlabelled skipped), patch %s, partitions "
            "%s on %s, peak %.1f MB per device",
            len(self.train_ids),
            len(self.held_ids),
            len(self.unlabelled),
            self.patch,
            partition.sizes,
            [d.rsplit("/", 1)[-1] for d in dict.fromkeys(partition.devices)],
            (self.peak or 0) / 2**20,
        )
        self.module, self.serve = _serving(model, self.patch)

    def checkpoint_groups(self):
        return {"": {"model": self.model, "optimizer": self.optimizer}}

    def dataset(self, epoch: int):
        import tensorflow as tf

        from headrace.pipelines.ct import volume_dataset
        from headrace.transforms.patches import sample_patches

        c, patch = self.config, self.patch
        if c.patch is not None:
            volumes = volume_dataset(c.data, shuffle=True, seed=c.seed, ids=self.train_ids, repeat=True)
            ds = sample_patches(
                volumes,
                patch,
                patches_per_volume=c.patches_per_volume,
                foreground_fraction=c.foreground_fraction,
                seed=c.seed,
            ).map(lambda p: (p["volume"], p["label"]))
        else:

            def pad(v):
                vol, lab = v["volume"], v["label"]
                paddings = tf.stack(
                    [tf.zeros(3, tf.int64), tf.constant(patch, tf.int64) - v["shape"]], axis=1
                )
                return (
                    tf.ensure_shape(tf.pad(vol, paddings, constant_values=tf.reduce_min(vol)), patch),
                    tf.ensure_shape(tf.pad(lab, paddings), patch),
                )

            ds = volume_dataset(c.data, ids=self.train_ids, shuffle=True, seed=c.seed, repeat=True).map(pad)
        return ds.map(lambda v, y: (v[None, ..., None], tf.cast(y[None], tf.int32))).prefetch(2)

    def place(self, batch, step: int):
        return batch

    def train_step(self, x, y):
        loss, dsc, grads = self._grads(x, y)
        self.optimizer.apply(grads, self.model.weights)
        return {"loss": loss, "soft_dice": dsc}

    def examples(self, batch) -> int:
        return 1

    # -- evaluation and outputs -------------------------------------------------------------------

    def predict_fn(self, window: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        return self.serve(tf.constant(window))["probability"].numpy()

    def evaluate(self, fit: loop.Fit) -> dict:
        """Dice of the held-out volumes, segmented through the exported patch forward (what `predict`
        runs)."""
        from headrace.models.metrics import dice
        from headrace.pipelines.ct import volume_dataset
        from headrace.transforms.volume import sliding_window

        self.scores, self.example = {}, None
        for v in volume_dataset(self.config.data, ids=self.held_ids):
            prob = sliding_window(v["volume"].numpy(), self.predict_fn, self.patch, self.config.overlap)
            truth = v["label"].numpy()
            self.scores[v["id"].numpy().decode()] = dice(prob > 0.5, truth)
            if self.example is None:
                self.example = (v["volume"].numpy(), truth, prob)
        score = float(np.mean(list(self.scores.values())))
        return {"train_dice": score, "dice": None} if self.eval_on_train else {"dice": score}

    def metrics(self, result: loop.FitResult) -> dict:
        loss = result.history["loss"]
        timed = sum(result.step_seconds[1:])  # the first step includes tracing
        return {
            "loss_history": loss,
            "dice_per_volume": self.scores,
            "eval_on_train_volumes": self.eval_on_train,
            "train_volumes": len(self.train_ids),
            "held_out_volumes": len(self.held_ids),
            "unlabelled_skipped": len(self.unlabelled),
            "peak_bytes_per_device": self.peak,
            "voxels_per_sec": math.prod(self.patch) * (len(loss) - 1) / timed if timed else None,
            "partitions": self.parts,
            "block_depths": list(self.partition.block_sizes),
            "slabs": len(self.partition.sizes),
            "devices": list(dict.fromkeys(self.partition.devices)),
            "patch": list(self.patch),
        }

    def curves(self, result: loop.FitResult) -> dict:
        steps = range(result.start_step + 1, result.steps + 1)
        return {
            "loss (CE + 1 - Dice)": (steps, result.history["loss"]),
            "soft Dice (train patch)": (steps, result.history["soft_dice"]),
        }

    def title(self, m) -> str:
        return f"unet3d, partitions={self.parts}, patch {self.patch}"

    def export(self, directory: Path) -> None:
        import tensorflow as tf

        tf.saved_model.save(self.module, str(directory), signatures={"serving_default": self.serve})

    def write_outputs(self, directory: Path, result: loop.FitResult, m: dict) -> None:
        if self.example is not None:
            _plot_prediction(directory / "predictions.png", *self.example)


def train_and_evaluate(config: UNet3DTrainConfig) -> dict:
    if not config.data:
        raise ConfigError("--data is required")
    if config.steps < 1 or config.channels < 1 or config.depth < 1:
        raise ConfigError("--steps, --channels and --depth must be >= 1")
    metrics = loop.fit(UNet3DTask(config))
    return {k: v for k, v in metrics.items() if k not in ("loss_history", "dice_per_volume")}


def _plot_prediction(path: Path, volume: np.ndarray, truth: np.ndarray, prob: np.ndarray) -> None:
    import matplotlib

    from headrace.models.metrics import dice

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
