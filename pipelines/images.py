"""image-ingest: a folder of class folders of images -> sharded TFRecords of JPEG bytes with labels.

    headrace run image-ingest --input DIR --output OUT [--shards 8] [--max-side 512] [--eval-fraction 0.1]

    (driver) list DIR/<class>/**/* -> classes.json (class name -> label, sorted names)
    Decode (Pillow: EXIF orientation, CMYK / grey / palette -> RGB; -> rejected) -> by split ->
        WriteTFRecordShards(train / eval) ; samples.png (a row of images per class) ; report.json ;
        manifest.jsonl (every file once: its split or "rejected", label, size, re-encoded, reason)

An image is any file Pillow decodes (JPEG, PNG, GIF, BMP, TIFF, WebP, ...). A JPEG that is already RGB,
upright and no larger than ``--max-side`` keeps its bytes; every other image is decoded, turned upright
by its EXIF orientation, converted to RGB (alpha over white), shrunk so that its longer side is at most
``--max-side``, and encoded as JPEG (quality ``--quality``): every record decodes with
``tf.io.decode_jpeg(channels=3)`` to the height and width it carries. Zero-byte, truncated, corrupt and
non-image files, images over Pillow's decompression-bomb limit and files outside a class folder are
rejected with their reason. Train and eval are split by a hash of the path below DIR (the same split
wherever the folder lies), shards by a hash of the path. ``files = train + eval + rejected`` in the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError, InputError
from headrace.transforms.counting import CountAll, ReasonCounts, reconcile
from headrace.transforms.imagefiles import decode_image
from headrace.transforms.io import Rejected, WriteJson, WriteJsonLines, match_files
from headrace.transforms.tfrecord import Feature, FeatureSpec, WriteSpec, WriteTFRecordShards

__all__ = ["CLASSES", "IMAGE_SPEC", "ImageIngestConfig", "build_image_ingest", "decode_image", "list_images"]

CLASSES = "classes.json"
SAMPLES = "samples.png"
MANIFEST = "manifest.jsonl"

IMAGE_SPEC = FeatureSpec(
    "image",
    {
        "image": Feature("bytes", (), description="JPEG bytes, RGB, upright"),
        "label": Feature("int64", (), description="class id (classes.json)"),
        "height": Feature("int64", (), description="height of the decoded JPEG, pixels"),
        "width": Feature("int64", (), description="width of the decoded JPEG, pixels"),
        "source": Feature("bytes", (), description="path below the input folder"),
    },
)


@dataclasses.dataclass(frozen=True)
class ImageIngestConfig:
    input: str = dataclasses.field(
        default="", metadata={"help": "folder of class folders of images", "required": True}
    )
    output: str = dataclasses.field(
        default="", metadata={"help": "output folder (or gs:// prefix)", "required": True}
    )
    shards: int = 8
    max_side: int = dataclasses.field(
        default=512, metadata={"help": "longer side above which an image is shrunk (pixels)"}
    )
    eval_fraction: float = 0.1
    quality: int = dataclasses.field(default=95, metadata={"help": "JPEG quality of re-encoded images"})
    samples_per_class: int = 8


@config_lib.register("image-ingest", command="run image-ingest")
def image_ingest() -> ImageIngestConfig:
    """Class folders of images -> JPEG TFRecords, 8 shards, longer side <= 512, 10% eval."""
    return ImageIngestConfig()


def _hash(text: str) -> float:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64


def list_images(files: list[str], root: str) -> tuple[list[tuple[str, str, str]], list[Rejected], list[str]]:
    """([(path, path below root, class)], files outside any class folder, sorted class names)."""
    root = root.rstrip("/")
    images, outside = [], []
    for path in files:
        rel = path[len(root) + 1 :] if path.startswith(root + "/") else os.path.basename(path)
        parts = rel.split("/")
        if len(parts) < 2 or parts[0].startswith("."):
            outside.append(Rejected(path, 0, "not in a class folder (DIR/<class>/...)", ""))
        elif not any(p.startswith(".") for p in parts):  # hidden files and folders are not images
            images.append((path, rel, parts[0]))
    return images, outside, sorted({c for _, _, c in images})


# -------------------------------------------------------------------------------------------------
# The pipeline
# -------------------------------------------------------------------------------------------------


class _Decode(beam.DoFn):
    """(path, rel, class) -> a record tagged train or eval, or a `Rejected`."""

    REJECTED = "rejected"
    MANIFEST = "manifest"

    def __init__(self, config: ImageIngestConfig, labels: dict[str, int]):
        self._config, self._labels = config, labels
        self._reencoded = beam.metrics.Metrics.counter("images", "reencoded")
        self._kept = beam.metrics.Metrics.counter("images", "jpeg_kept")

    def process(self, element):
        path, rel, name = element
        try:
            with FileSystems.open(path, compression_type="uncompressed") as f:
                data = f.read()
            jpeg, height, width, reencoded = decode_image(
                data, max_side=self._config.max_side, quality=self._config.quality
            )
        except (OSError, ValueError) as exc:
            yield beam.pvalue.TaggedOutput(self.REJECTED, Rejected(path, 0, str(exc), ""))
            return
        (self._reencoded if reencoded else self._kept).inc()
        split = "eval" if _hash(rel) < self._config.eval_fraction else "train"
        record = {"image": jpeg, "label": self._labels[name], "height": height, "width": width, "source": rel}
        yield beam.pvalue.TaggedOutput(split, record)
        yield beam.pvalue.TaggedOutput(
            self.MANIFEST,
            {"source": rel, "status": split, "label": record["label"], "height": height, "width": width,
             "reencoded": reencoded, "reason": ""},
        )  # fmt: skip


def _write_samples(samples: list[tuple[int, str]], path: str, classes: list[str], per_class: int) -> None:
    """A grid PNG: one row per class, up to `per_class` of its records (the first by a hash of the path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    rows = {}
    for label, jpeg in samples:
        rows.setdefault(label, []).append(jpeg)
    n = max(1, len(classes))
    fig, axes = plt.subplots(n, per_class, figsize=(per_class * 1.2, n * 1.3), squeeze=False)
    for label, name in enumerate(classes):
        for j in range(per_class):
            ax = axes[label][j]
            ax.axis("off")
            images = rows.get(label, [])
            if j < len(images):
                ax.imshow(np.asarray(Image.open(io.BytesIO(images[j])).convert("RGB")))
            if j == 0:
                ax.set_title(name, fontsize=7, loc="left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    with FileSystems.create(path) as f:
        f.write(buf.getvalue())


def _rejected_line(r: Rejected, root: str) -> dict:
    rel = r.source[len(root) + 1 :] if r.source.startswith(root + "/") else r.source
    return {"source": rel, "status": "rejected", "label": None, "height": None, "width": None,
            "reencoded": None, "reason": r.reason}  # fmt: skip


def _write_manifest(lines: list[dict], path: str) -> None:
    with FileSystems.create(path) as f:
        for line in sorted(lines, key=lambda r: r["source"]):
            f.write((json.dumps(line) + "\n").encode())


def _report(counts: dict, reasons: dict, per_class: dict, classes: list[str]) -> dict:
    report = {
        "files": counts["files"],
        "train": counts["train"],
        "eval": counts["eval"],
        "rejected": counts["rejected"],
        "classes": len(classes),
        "per_class": {classes[k]: v for k, v in sorted(per_class.items())},
        "rejected_reasons": reasons,
    }
    reconcile(report, "files", ("train", "eval", "rejected"))
    return report


def build_image_ingest(pipeline: beam.Pipeline, config: ImageIngestConfig) -> dict:
    if not config.input:
        raise ConfigError("--input is required")
    if config.shards < 1 or config.max_side < 8 or not 0 <= config.eval_fraction < 1:
        raise ConfigError("--shards >= 1, --max-side >= 8, --eval-fraction in [0, 1)")
    if not 1 <= config.quality <= 100:
        raise ConfigError("--quality in [1, 100]")
    root = config.input.rstrip("/")
    if root.endswith("*"):
        raise ConfigError(f"--input {config.input}: a folder of class folders, not a pattern")
    out = config.output.rstrip("/")
    files = [f for f in match_files(f"{root}/**", flag="--input") if not f.endswith("/")]
    images, outside, classes = list_images(files, root)
    if not classes:
        raise InputError(f"--input {config.input}: no class folders (DIR/<class>/<image>) with files")
    labels = {name: i for i, name in enumerate(classes)}
    with FileSystems.create(f"{out}/{CLASSES}") as f:
        f.write(json.dumps({"classes": classes, "labels": labels}, indent=2).encode())
    eval_shards = max(1, round(config.shards * config.eval_fraction)) if config.eval_fraction else 1

    decoded = (
        pipeline
        | "ListFiles" >> beam.Create(images)
        | "Spread" >> beam.Reshuffle()
        | "Decode"
        >> beam.ParDo(_Decode(config, labels)).with_outputs(
            _Decode.REJECTED, _Decode.MANIFEST, "train", "eval"
        )
    )
    outside_files = pipeline | "Outside" >> beam.Create(outside)
    rejected = (decoded.rejected, outside_files) | "AllRejected" >> beam.Flatten()
    decoded.train | "WriteTrain" >> WriteTFRecordShards(IMAGE_SPEC, f"{out}/train", config.shards)
    decoded.eval | "WriteEval" >> WriteTFRecordShards(IMAGE_SPEC, f"{out}/eval", eval_shards)
    pipeline | "WriteSpec" >> WriteSpec(out, {"train": IMAGE_SPEC, "eval": IMAGE_SPEC})
    rejected | "WriteRejected" >> WriteJsonLines(f"{out}/rejected/rejected")
    (
        (decoded.manifest, rejected | "RejectedLines" >> beam.Map(_rejected_line, root))
        | "AllLines" >> beam.Flatten()
        | "ManifestList" >> beam.combiners.ToList()
        | "WriteManifest" >> beam.Map(_write_manifest, f"{out}/{MANIFEST}")
    )

    records = (decoded.train, decoded.eval) | "AllRecords" >> beam.Flatten()
    per = config.samples_per_class
    samples = (
        decoded.train
        | "SampleKey" >> beam.Map(lambda r: (r["label"], (_hash(r["source"]), r["image"])))
        | "FirstPerClass" >> beam.combiners.Top.PerKey(per, key=lambda hv: -hv[0])
        | "Flat" >> beam.FlatMap(lambda kv: [(kv[0], jpeg) for _, jpeg in kv[1]])
        | "AllSamples" >> beam.combiners.ToList()
    )
    samples | "WriteSamples" >> beam.Map(_write_samples, f"{out}/{SAMPLES}", classes, per)
    per_class = (
        records
        | "Labels" >> beam.Map(lambda r: r["label"])
        | "PerClass" >> beam.combiners.Count.PerElement()
        | "PerClassDict" >> beam.combiners.ToDict()
    )
    everything = (records, rejected) | "AllFiles" >> beam.Flatten()
    counts = {
        "files": everything,
        "train": decoded.train,
        "eval": decoded.eval,
        "rejected": rejected,
    } | "Counts" >> CountAll()
    reasons = rejected | "Reasons" >> ReasonCounts()
    report = counts | "Report" >> beam.Map(
        _report, beam.pvalue.AsSingleton(reasons), beam.pvalue.AsSingleton(per_class), classes
    )
    report | "WriteReport" >> WriteJson(f"{out}/report.json")
    return {"report": report}
