"""``headrace train resnet``: ResNet v1.5 on image-ingest shards, data parallel on a DTensor mesh, with
batch norm reduced over groups of replicas.

    headrace train resnet --data OUT --output M [--depth {18,34,50,101}] [--mesh batch=8]
        [--bn-group-size G] [--optimizer {sgd,lars}] [--batch-size B] [--steps N | --epochs E]

Reads ``OUT/train-*`` through `headrace.transforms.image_input` (sampled crops decoded alone, flips,
per-batch normalisation) and evaluates ``OUT/eval-*`` (central crops, cached) after every epoch and at
the end: top-1 and top-5. ``--bn-group-size G`` puts G replicas in each batch-norm group (0: all of
them); the learning rate is ``--learning-rate`` per 256 examples, warmed up linearly for
``--warmup-epochs`` and decayed by a cosine or a quadratic polynomial to zero; label smoothing; weight
decay on kernels only; momentum SGD or LARS (`headrace.models.optim.Momentum`).

Writes ``M/metrics.json`` (``top1``, ``top5``, ``images_per_sec``, ``steady_images_per_sec``, and the
step time split into ``input_wait_seconds_per_step`` and ``compute_seconds_per_step``), ``curves.png``,
``augmented.png`` (a batch of training crops as the model sees them), TensorBoard summaries,
checkpoints, ``classes.json`` and ``saved_model/`` (``serving_default``: JPEG bytes [N] ->
``probabilities`` [N, K], ``class_id`` and ``class_name``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf

from headrace.core import cluster
from headrace.core import config as config_lib
from headrace.core import mesh as mesh_lib
from headrace.core.errors import ConfigError, InputError
from headrace.models.optim import Momentum
from headrace.models.resnet import ResNet, ResNetConfig
from headrace.pipelines.images import CLASSES
from headrace.runners import loop
from headrace.transforms import image_input

__all__ = ["ResNetTask", "ResNetTrainConfig", "learning_rate", "train_and_evaluate"]


@dataclasses.dataclass(frozen=True)
class ResNetTrainConfig(loop.TrainConfig):
    data: str = dataclasses.field(default="", metadata={"help": "output of `headrace run image-ingest`"})
    mesh: str = dataclasses.field(
        default="auto", metadata={"help": "batch=N, '' (plain TF) or auto (batch over every device)"}
    )
    depth: int = 50
    width: int = 64
    image_size: int = 224
    small_inputs: bool = dataclasses.field(
        default=False, metadata={"help": "3x3 stem, no max pool (images of 32 pixels and less)"}
    )
    bn_group_size: int = dataclasses.field(
        default=0, metadata={"help": "replicas per batch-norm group (0: all; 1: each its own)"}
    )
    optimizer: str = dataclasses.field(default="sgd", metadata={"help": "sgd | lars"})
    batch_size: int = 64
    steps: int = 0
    epochs: int = dataclasses.field(default=0, metadata={"help": "used when --steps is 0"})
    learning_rate: float = dataclasses.field(default=0.1, metadata={"help": "per 256 examples"})
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lars_eta: float = 0.001
    warmup_epochs: float = 1.0
    schedule: str = dataclasses.field(default="cosine", metadata={"help": "cosine | poly"})
    label_smoothing: float = 0.1
    min_crop_area: float = dataclasses.field(
        default=0.08, metadata={"help": "smallest share of the image a training crop covers"}
    )
    crop_padding: int = dataclasses.field(
        default=32, metadata={"help": "eval keeps size / (size + padding) of the shorter side"}
    )
    flip: bool = True
    input_dtype: str = dataclasses.field(default="float32", metadata={"help": "float32 | bfloat16"})
    export: bool = True


@config_lib.register("resnet", command="train resnet")
def resnet() -> ResNetTrainConfig:
    """ResNet-50 v1.5 on 224-pixel crops, SGD 0.1 per 256, cosine, batch norm over every replica."""
    return ResNetTrainConfig(epochs=1)


@config_lib.register("resnet-digits", command="train resnet")
def resnet_digits() -> ResNetTrainConfig:
    """ResNet-18 on scikit-learn's 8x8 digits at 32 pixels: 3x3 stem, no flips, whole-image eval."""
    return ResNetTrainConfig(
        depth=18, width=32, image_size=32, small_inputs=True, batch_size=64, epochs=12,
        learning_rate=0.8, warmup_epochs=1, weight_decay=5e-4, min_crop_area=0.6,
        crop_padding=0, flip=False, label_smoothing=0.0,
    )  # fmt: skip


def learning_rate(step, *, peak: float, warmup: int, total: int, schedule: str):
    """The rate at `step` (0-based): linear warm-up to `peak` over `warmup` steps, then cosine or
    quadratic decay to 0 at `total`."""
    t = tf.cast(step, tf.float32)
    warm = peak * (t + 1.0) / float(max(warmup, 1))
    progress = tf.clip_by_value((t - warmup) / float(max(total - warmup, 1)), 0.0, 1.0)
    if schedule == "cosine":
        decayed = peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
    else:
        decayed = peak * tf.square(1.0 - progress)
    return tf.where(t < warmup, warm, decayed)


class ResNetTask(loop.Task):
    name = "resnet"
    eval_every_epoch = True

    def __init__(self, config: ResNetTrainConfig):
        super().__init__(config)
        c = config
        if c.optimizer not in ("sgd", "lars") or c.schedule not in ("cosine", "poly"):
            raise ConfigError("--optimizer sgd | lars and --schedule cosine | poly")
        if c.input_dtype not in ("float32", "bfloat16"):
            raise ConfigError("--input-dtype float32 | bfloat16")
        report = Path(c.data) / "report.json"
        if not (Path(c.data) / CLASSES).is_file() or not report.is_file():
            raise InputError(
                f"--data {c.data}: no {CLASSES} (is it the output of `headrace run image-ingest`?)"
            )
        self.classes = json.loads((Path(c.data) / CLASSES).read_text())["classes"]
        self.train_examples = int(json.loads(report.read_text())["train"])
        self.per_epoch = self.train_examples // c.batch_size
        if self.per_epoch < 1:
            raise InputError(
                f"--data {c.data}: {self.train_examples} training images, fewer than --batch-size"
            )
        self.steps = c.steps or c.epochs * self.per_epoch
        if self.steps < 1:
            raise ConfigError("--steps or --epochs must be >= 1")
        self.model_config = ResNetConfig(
            depth=c.depth,
            num_classes=len(self.classes),
            width=c.width,
            small_inputs=c.small_inputs,
            seed=c.seed,
        )
        self._eval = None

    def create_mesh(self):
        spec = self.config.mesh
        if spec == "auto":  # every GPU, else every (virtual) CPU device
            gpus = len(tf.config.list_physical_devices("GPU"))
            spec = f"batch={gpus or len(tf.config.list_logical_devices('CPU'))}"
        if not spec:
            return None
        if [name for name, _ in mesh_lib.parse_mesh(spec)] != ["batch"]:
            raise ConfigError(f"--mesh {spec}: ResNet is data parallel; give batch=N")
        return mesh_lib.create_mesh(spec)

    def build(self, mesh) -> None:
        c = self.config
        replicas = mesh.dim_size("batch") if mesh is not None else 1
        group = c.bn_group_size or replicas
        if replicas % group:
            raise ConfigError(f"--bn-group-size {group} does not divide the {replicas} replicas")
        if c.batch_size % replicas:
            raise ConfigError(f"--batch-size {c.batch_size} does not split over {replicas} replicas")
        self.bn_groups = replicas // group
        self.model = ResNet(self.model_config, mesh, bn_groups=self.bn_groups)
        self.optimizer = Momentum(
            self.model.weights,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
            decay_mask=self.model.decay_mask(),
            lars_eta=c.lars_eta if c.optimizer == "lars" else None,
        )
        self.peak_lr = c.learning_rate * c.batch_size / 256
        self.warmup = round(c.warmup_epochs * self.per_epoch)

    def checkpoint_groups(self):
        return {"": {"model": self.model, "optimizer": self.optimizer}}

    def total_steps(self) -> int:
        return self.steps

    def steps_per_epoch(self) -> int:
        return self.per_epoch

    def _train_data(self, epoch: int):
        c = self.config
        clients = cluster.Clients.current()  # each client reads its own files, its part of the batch
        if c.input_shards not in (0, clients.count):
            raise ConfigError("resnet reads one input stream per client: leave --input-shards at 0")
        return image_input.image_dataset(
            c.data, "train", c.batch_size // clients.count, image_size=c.image_size, seed=c.seed, epoch=epoch,
            num_clients=clients.count, client_id=clients.index,
            dtype=c.input_dtype, area_range=(c.min_crop_area, 1.0), flip=c.flip,
        )  # fmt: skip

    def dataset(self, epoch: int):
        return self._train_data(epoch).take(self.per_epoch)

    def place(self, batch, step: int):
        return self.model.place(batch["image"].numpy(), batch["label"].numpy())

    def train_step(self, images, onehot, labels):
        lr = learning_rate(
            self.optimizer.iterations, peak=self.peak_lr, warmup=self.warmup, total=self.steps,
            schedule=self.config.schedule,
        )  # fmt: skip
        stats = []
        with tf.GradientTape() as tape:
            loss, logits = self.model.loss(
                images, onehot, labels, label_smoothing=self.config.label_smoothing, stats=stats
            )
        grads = tape.gradient(loss, self.model.weights)
        self.optimizer.apply(grads, self.model.weights, lr)
        self.model.update_moving_statistics(stats)
        top1 = tf.reduce_mean(
            tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
        )
        return {"loss": loss, "train_top1": top1, "learning_rate": lr}

    def examples(self, batch) -> int:
        return self.config.batch_size

    # -- evaluation and outputs -------------------------------------------------------------------

    def predict_step(self, images, onehot):
        return self.model(images)  # inference: the moving statistics

    def _eval_data(self):
        c = self.config
        if self._eval is None:  # one dataset object: its decoded cache lasts the run
            self._eval = image_input.image_dataset(
                c.data, "eval", c.batch_size, image_size=c.image_size, dtype=c.input_dtype,
                crop_padding=c.crop_padding,
            )  # fmt: skip
        return ({k: v.numpy() for k, v in b.items()} for b in self._eval)

    def evaluate(self, fit: loop.Fit) -> dict:
        top1 = top5 = n = 0
        place = lambda b: self.model.place(b["image"])
        for batch, logits in fit.predict(self._eval_data(), place):
            labels = batch["label"]
            order = np.argsort(-logits, axis=-1)
            top1 += int(np.sum(order[:, 0] == labels))
            top5 += int(np.sum(np.any(order[:, :5] == labels[:, None], axis=-1)))
            n += len(labels)
        return {"top1": top1 / n, "top5": top5 / n, "eval_images": n} if n else {}

    def metrics(self, result: loop.FitResult) -> dict:
        steps = result.step_seconds[1:] or result.step_seconds
        compute = float(np.median(steps)) if steps else None
        wait = max(0.0, result.train_seconds - sum(result.step_seconds)) / max(len(result.step_seconds), 1)
        return {
            "depth": self.model_config.depth,
            "bn_group_size": (self.config.bn_group_size or None),
            "bn_groups": self.bn_groups,
            "images_per_sec": result.examples_per_sec,
            "steady_images_per_sec": self.config.batch_size / compute if compute else None,
            "compute_seconds_per_step": compute,
            "input_wait_seconds_per_step": wait,
            "parameters": int(sum(np.prod(w.shape) for w in self.model.weights)),
        }

    def curves(self, result: loop.FitResult) -> dict:
        return {k: v for k, v in result.curves().items() if not k.endswith("eval_images")}

    def title(self, m) -> str:
        return f"ResNet-{self.model_config.depth}: eval top-1 {m.get('top1', float('nan')):.4f}"

    def export(self, directory: Path) -> None:
        module, signatures = _serving(self)
        tf.saved_model.save(module, str(directory), signatures=signatures)

    def write_outputs(self, directory: Path, result: loop.FitResult, m: dict) -> None:
        shutil.copy(Path(self.config.data) / CLASSES, directory / CLASSES)
        (batch,) = self._train_data(0).take(1)
        _plot_crops(directory / "augmented.png", batch, self.classes)


def _serving(task: ResNetTask):
    """An unsharded copy of the trained model behind a signature taking JPEG bytes."""
    c = task.config
    model = ResNet(task.model_config)
    trained = task.model.weights + [bn[k] for bn in task.model.batch_norms for k in ("mean", "variance")]
    copy = model.weights + [bn[k] for bn in model.batch_norms for k in ("mean", "variance")]
    for target, source in zip(copy, trained):
        target.assign(mesh_lib.to_numpy(source))
    names = tf.constant(task.classes)
    normalize = image_input._normalize("float32")

    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="jpeg")])
        def serve(self, jpeg):
            images = tf.map_fn(
                lambda b: image_input._center_crop(b, c.image_size, c.crop_padding),
                jpeg,
                fn_output_signature=tf.TensorSpec([c.image_size, c.image_size, 3], tf.uint8),
            )
            batch = normalize({"image": images, "label": tf.zeros(tf.shape(jpeg), tf.int64)})
            probabilities = tf.nn.softmax(self.model(batch["image"]), axis=-1)
            class_id = tf.argmax(probabilities, -1, output_type=tf.int32)
            return {
                "probabilities": probabilities,
                "class_id": class_id,
                "class_name": tf.gather(names, class_id),
            }

    module = Serving()
    return module, {"serving_default": module.serve}


def _plot_crops(path: Path, batch, classes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = batch["image"].numpy().astype(np.float32) * image_input.STDDEV_RGB + image_input.MEAN_RGB
    labels = batch["label"].numpy()
    n = min(32, len(images))
    cols = 8
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(cols * 1.2, -(-n // cols) * 1.35), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        ax = axes.ravel()[i]
        ax.imshow(np.clip(images[i] / 255.0, 0, 1))
        ax.set_title(classes[labels[i]], fontsize=7)
    fig.suptitle("training crops as the model sees them", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def train_and_evaluate(config: ResNetTrainConfig) -> dict:
    if not config.data:
        raise ConfigError("--data is required")
    return loop.fit(ResNetTask(config))
