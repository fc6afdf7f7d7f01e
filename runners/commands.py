"""The table of pipelines and trainers the CLI knows, imported lazily.

Each entry names the module that registers the command's configs and the function the CLI calls. Keeping
this table free of heavy imports means ``headrace --help`` does not load TensorFlow or Beam; a command's
module is imported only when that command runs (or when all configs are listed).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = [
    "GENERATORS",
    "PIPELINES",
    "PREDICTORS",
    "RETRAINERS",
    "SERVERS",
    "STREAMS",
    "TRAINERS",
    "Command",
    "load_all",
]


@dataclass(frozen=True)
class Command:
    """``verb name`` (``run example``): its module, entry function and default registered config."""

    verb: str
    name: str
    module: str
    function: str
    default_config: str
    summary: str

    @property
    def key(self) -> str:
        return f"{self.verb} {self.name}"

    def load(self):
        """The entry function (importing the module registers the command's configs)."""
        return getattr(importlib.import_module(self.module), self.function)


PIPELINES = {
    c.name: c
    for c in [
        Command(
            "run",
            "example",
            "headrace.pipelines.example",
            "build_example",
            "example",
            "CSV records -> validated, split TFRecord shards (the foundation's example)",
        ),
        Command(
            "run",
            "crowd-labels",
            "headrace.pipelines.crowd",
            "build_crowd_labels",
            "crowd-labels",
            "crowdsourced labels -> majority vote, Dawid-Skene or GroupAnno EM aggregation",
        ),
        Command(
            "run",
            "text-ingest",
            "headrace.pipelines.text",
            "build_text_ingest",
            "text-ingest",
            "text files -> SentencePiece vocabulary and packed token rows for the Transformer",
        ),
        Command(
            "run",
            "omni-ingest",
            "headrace.pipelines.omni",
            "build_omni_ingest",
            "omni-ingest",
            "text, audio, image and video examples -> learned codebooks and one packed, interleaved token stream",
        ),
        Command(
            "run",
            "image-ingest",
            "headrace.pipelines.images",
            "build_image_ingest",
            "image-ingest",
            "class folders of images -> sharded TFRecords of JPEG bytes, labels, sizes, a sample grid",
        ),
        Command(
            "run",
            "ctr-ingest",
            "headrace.pipelines.ctr",
            "build_ctr_ingest",
            "ctr-ingest",
            "Criteo TSV / Parquet CTR logs -> sharded TFRecords, feature statistics, vocabularies",
        ),
        Command(
            "run",
            "ctr-score",
            "headrace.pipelines.ctr_score",
            "build_ctr_score",
            "ctr-score",
            "Criteo-format lines -> click probabilities from a SavedModel, with Beam's RunInference",
        ),
        Command(
            "run",
            "ct-ingest",
            "headrace.pipelines.ct",
            "build_ct_ingest",
            "ct-ingest",
            "a folder of DICOM series and NIfTI files -> sharded HU volumes (resampled, blocked), previews",
        ),
    ]
}

TRAINERS = {
    c.name: c
    for c in [
        Command(
            "train",
            "mlp",
            "headrace.runners.train_mlp",
            "train_and_evaluate",
            "mlp",
            "the example MLP on the example shards, data and model parallel",
        ),
        Command(
            "train",
            "lm",
            "headrace.runners.train_lm",
            "train_and_evaluate",
            "lm",
            "decoder-only Transformer (talking-heads or multi-head) on text-ingest rows, data and model parallel",
        ),
        Command(
            "train",
            "omni",
            "headrace.runners.train_omni",
            "train_and_evaluate",
            "omni",
            "the talking-heads decoder on omni-ingest streams: one vocabulary over text, audio and image codes",
        ),
        Command(
            "train",
            "resnet",
            "headrace.runners.train_resnet",
            "train_and_evaluate",
            "resnet",
            "ResNet v1.5 on image-ingest shards, data parallel, batch norm over groups of replicas",
        ),
        Command(
            "train",
            "crowd-classifier",
            "headrace.runners.train_crowd_classifier",
            "train_and_evaluate",
            "crowd-classifier",
            "a text classifier learned from crowd-labels posteriors (soft labels)",
        ),
        Command(
            "train",
            "ctr",
            "headrace.runners.train_ctr",
            "train_and_evaluate",
            "ctr",
            "LR / FM / Wide&Deep / DeepFM / DCN / DCN-v2 on the ctr-ingest shards, collisionless table",
        ),
        Command(
            "train",
            "unet3d",
            "headrace.runners.train_unet3d",
            "train_and_evaluate",
            "unet3d",
            "3D U-Net on the ct-ingest volumes, spatially partitioned across devices (halo exchange)",
        ),
    ]
}

PREDICTORS = {
    c.name: c
    for c in [
        Command(
            "predict",
            "unet3d",
            "headrace.runners.predict_unet3d",
            "predict",
            "unet3d-predict",
            "sliding-window segmentation of ct-ingest volumes with a trained unet3d",
        ),
    ]
}


GENERATORS = {
    c.name: c
    for c in [
        Command(
            "generate",
            "lm",
            "headrace.runners.generate_lm",
            "generate",
            "lm-generate",
            "text from a trained lm, a token at a time with a key-value cache",
        ),
        Command(
            "generate",
            "omni",
            "headrace.runners.generate_omni",
            "generate",
            "omni-generate",
            "a trained omni model answers a spoken, written or pictured prompt in text, audio or an image",
        ),
    ]
}


STREAMS = {
    c.name: c
    for c in [
        Command(
            "stream",
            "ctr-join",
            "headrace.runners.stream",
            "ctr_join",
            "ctr-join",
            "Kafka impressions + actions -> examples (state and timers, sampled negatives) on Flink",
        ),
        Command(
            "stream",
            "replay",
            "headrace.runners.stream",
            "replay",
            "replay",
            "a Criteo log -> impression and delayed click events on Kafka, in real time",
        ),
    ]
}


SERVERS = {
    c.name: c
    for c in [
        Command(
            "serve",
            "ctr",
            "headrace.runners.serve",
            "serve",
            "serve-ctr",
            "predictions from the online trainer's serving copies (TF Serving's REST shape, hot version swaps)",
        ),
    ]
}


RETRAINERS = {
    c.name: c
    for c in [
        Command(
            "retrain",
            "ctr",
            "headrace.runners.retrain",
            "retrain_ctr",
            "retrain-ctr",
            "one day of CTR logs: ingest, warm-start from current, evaluate, promote if not worse",
        ),
        Command(
            "retrain",
            "crowd",
            "headrace.runners.retrain_crowd",
            "retrain_crowd",
            "retrain-crowd",
            "one day of annotations: merged with every earlier day, aggregated, changes listed, promoted",
        ),
    ]
}


def load_all() -> None:
    """Imports every command module so that all configs are registered."""
    tables = (PIPELINES, TRAINERS, PREDICTORS, GENERATORS, STREAMS, SERVERS, RETRAINERS)
    for command in [c for table in tables for c in table.values()]:
        importlib.import_module(command.module)
