"""``headrace predict unet3d``: segment every volume of a ct-ingest output with a trained 3D U-Net.

    headrace predict unet3d --model M --input OUT --output PRED [--overlap 0.5]

Reads ``M/saved_model`` (what ``headrace train unet3d`` exports: the patch forward) and segments each
volume by a sliding window of the training patch (`headrace.transforms.volume.sliding_window`). The
output is laid out as a ct-ingest output, so `headrace.pipelines.ct.dataset` reads it: volumes hold the
foreground probability, labels the mask (probability > 0.5); previews, spec.json and report.json (Dice
where the input had a label) beside them. It appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError, InputError

__all__ = ["UNet3DPredictConfig", "predict"]


@dataclasses.dataclass(frozen=True)
class UNet3DPredictConfig:
    model: str = dataclasses.field(default="", metadata={"help": "a `train unet3d` output folder"})
    input: str = dataclasses.field(default="", metadata={"help": "a ct-ingest output folder"})
    output: str = ""
    overlap: float = 0.5
    partitions: int = 1


@config_lib.register("unet3d-predict", command="predict unet3d")
def unet3d_predict() -> UNet3DPredictConfig:
    """Sliding-window segmentation of every volume of a ct-ingest output."""
    return UNet3DPredictConfig()


def predict(config: UNet3DPredictConfig) -> dict:
    """Segments every volume of a ct-ingest output with a trained model's SavedModel; the output is laid
    out as a ct-ingest output (volumes = probabilities, labels = masks), with previews and Dice."""
    import tensorflow as tf

    from headrace.core.outputs import staged_output
    from headrace.models.metrics import dice
    from headrace.pipelines.ct import VOLUME_SPEC, volume_dataset
    from headrace.transforms.preview import write_preview
    from headrace.transforms.tfrecord import example_chunks, write_record_chunks, write_spec
    from headrace.transforms.volume import sliding_window

    if not config.model or not config.input:
        raise ConfigError("--model and --input are required")
    saved = Path(config.model) / "saved_model"
    if not saved.is_dir():
        raise InputError(f"--model {config.model}: no saved_model/ (is it a `train unet3d` output?)")
    patch = tuple(json.loads((Path(config.model) / "metrics.json").read_text())["patch"])
    serve = tf.saved_model.load(str(saved)).signatures["serving_default"]

    def predict_fn(window):
        return serve(volume=tf.constant(window))["probability"].numpy()

    results = {}
    with staged_output(config.output, overwrite=True) as out:
        (out / "previews").mkdir()
        with open(out / "volumes-00000-of-00001.tfrecord", "wb") as f:
            for v in volume_dataset(config.input):
                id_ = v["id"].numpy().decode()
                volume = v["volume"].numpy()
                prob = sliding_window(volume, predict_fn, patch, config.overlap)
                mask = (prob > 0.5).astype(np.uint8)
                spacing = v["spacing"].numpy()
                record = {
                    "id": id_.encode(),
                    "volume": prob,
                    "shape": list(prob.shape),
                    "spacing": list(spacing),
                }
                write_record_chunks(f, example_chunks(VOLUME_SPEC, {**record, "label": mask}))
                write_preview(
                    str(out / "previews" / f"{id_}.png"), volume, mask, tuple(spacing), f"{id_} predicted"
                )
                entry = {"shape": list(prob.shape), "foreground_voxels": int(mask.sum())}
                if bool(v["has_label"]):
                    entry["dice"] = dice(mask, v["label"].numpy())
                results[id_] = entry
        write_spec(out, {"volumes": VOLUME_SPEC})
        report = {"volumes": len(results), "per_volume": results}
        scored = [r["dice"] for r in results.values() if "dice" in r]
        if scored:
            report["mean_dice"] = float(np.mean(scored))
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return {k: v for k, v in report.items() if k != "per_volume"}
