"""Benchmark: float vs int8 inference (``headrace export ctr|unet3d --int8``), latency and quality side by side.

    python bench/quantized.py [--ctr-steps 300] [--unet-steps 60] [--repeats 200]

CTR (DeepFM, embedding 16, MLP 256-128, trained --ctr-steps on 60,000 generated lines): AUC on the eval
split and latency of one request of 1 and of 256 rows, for

* the SavedModel's ``serving_default`` (TensorFlow: hashing, id table, graph);
* TFLite float32 and TFLite int8 of the graph after the table (rows -> probability), with the
  hashing and the row lookup outside counted in (``CTRLite``), and the graph alone.

U-Net (channels 8, 3 levels, patch 16x32x32, trained --unet-steps at learning rate 0.003 on phantoms): Dice of the held-out
volumes by sliding window, and latency of a batch of 1 and of 8 patches (256 patches of 16x32x32 would
be 4M voxels a request: not a serving shape), for the SavedModel, TFLite float32 and int8.

Latency: wall time of --repeats calls after 10 warm-up calls, p50 and p99; TFLite with as many threads
as cores, TensorFlow with its default pools. The int8/float column is the ratio of p50s in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

from headrace.core import mesh as mesh_lib  # noqa: E402

mesh_lib.configure_virtual_devices(2)  # `train unet3d` in this process: devices before TensorFlow starts

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from headrace.models.criteo import FIELDS  # noqa: E402
from headrace.models.metrics import auc, dice  # noqa: E402
from headrace.models.quantize import TFLiteModel  # noqa: E402
from headrace.pipelines import ct_data, ctr  # noqa: E402
from headrace.pipelines.ct import CtIngestConfig, build_ct_ingest, volume_dataset  # noqa: E402
from headrace.pipelines.ctr_data import generate  # noqa: E402
from headrace.runners import cli, export  # noqa: E402
from headrace.runners.beam_runner import run_pipeline  # noqa: E402
from headrace.runners.retrain import _split_columns  # noqa: E402
from headrace.runners.train_ctr import CTRTrainConfig, train_and_evaluate  # noqa: E402
from headrace.transforms.volume import sliding_window  # noqa: E402


def _latency(fn, repeats: int) -> tuple[float, float]:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def _ctr(root: Path, args) -> list[tuple]:
    generate(root / "logs.tsv", 60000, seed=1)
    run_pipeline(
        ctr.build_ctr_ingest, ctr.CtrIngestConfig(input=str(root / "logs.tsv"), output=str(root / "data"))
    )
    config = CTRTrainConfig(
        data=str(root / "data"),
        output=str(root / "ctr"),
        steps=args.ctr_steps,
        batch_size=512,
        mesh="",
        log_every_seconds=60,
    )
    train_and_evaluate(config)
    export.export_ctr(str(root / "ctr"), int8=True)
    columns, labels = _split_columns(str(root / "data"), "eval")
    serve = tf.saved_model.load(str(root / "ctr" / "saved_model")).signatures["serving_default"]

    def saved(cols):
        return serve(**{k: tf.constant(cols[k]) for k in FIELDS})["probability"].numpy()

    threads = os.cpu_count()
    lite = {
        kind: export.CTRLite(root / "ctr" / "tflite", kind, num_threads=threads)
        for kind in ("float32", "int8")
    }
    rows_all = lite["int8"].rows(columns)
    reference = saved(columns)
    probs = {kind: model.probability(columns) for kind, model in lite.items()}
    out = []
    for batch in (1, 256):
        cols = {k: v[:batch] for k, v in columns.items()}
        rows = rows_all[:batch]
        timing = _latency(lambda c=cols: saved(c), args.repeats)
        out.append(("ctr", "SavedModel (TF)", batch, *timing, auc(labels, reference), 0.0))
        for kind, model in lite.items():
            p = probs[kind]
            timing = _latency(lambda c=cols, m=model: m.probability(c), args.repeats)
            out.append(
                ("ctr", f"TFLite {kind}", batch, *timing, auc(labels, p), float(np.abs(p - reference).max()))
            )
            timing = _latency(lambda r=rows, m=model: m.model(r), args.repeats)
            out.append(("ctr", f"  {kind} graph alone", batch, *timing, None, None))
    return out


def _unet(root: Path, args) -> list[tuple]:
    for k in range(6):
        ph = ct_data.phantom((32, 48, 48), seed=k, lesion_radius=0.3)
        ct_data.write_nifti(root / "in" / f"case{k}.nii.gz", ph.hu)
        ct_data.write_nifti(root / "in" / f"case{k}_label.nii.gz", ph.label, dtype=np.uint8)
    run_pipeline(build_ct_ingest, CtIngestConfig(input=str(root / "in"), output=str(root / "ct")))
    argv = [
        "train",
        "unet3d",
        "--data",
        str(root / "ct"),
        "--output",
        str(root / "unet"),
        "--steps",
        str(args.unet_steps),
    ]
    flags = ["--patch", "16,32,32", "--channels", "8", "--depth", "3", "--learning-rate", "0.003"]
    assert cli.main([*argv, *flags]) == 0
    export.export_unet3d(str(root / "unet"), int8=True)
    patch = tuple(json.loads((root / "unet" / "metrics.json").read_text())["patch"])
    serve = tf.saved_model.load(str(root / "unet" / "saved_model")).signatures["serving_default"]
    volumes = [(v["volume"].numpy(), v["label"].numpy()) for v in volume_dataset(str(root / "ct"))][-2:]
    forwards = {"SavedModel (TF)": lambda w: serve(volume=tf.constant(w))["probability"].numpy()}
    for kind in ("float32", "int8"):
        content = (root / "unet" / "tflite" / f"{kind}.tflite").read_bytes()
        model = TFLiteModel(content, num_threads=os.cpu_count())
        forwards[f"TFLite {kind}"] = lambda w, m=model: m(w.astype(np.float32))[0]
    masks = {
        name: [sliding_window(v, fn, patch, 0.5) > 0.5 for v, _ in volumes] for name, fn in forwards.items()
    }
    truth = [y for _, y in volumes]
    tf_masks = masks["SavedModel (TF)"]
    out = []
    for batch in (1, 8):
        x = np.random.default_rng(0).normal(size=(batch, *patch, 1)).astype(np.float32)
        for name, fn in forwards.items():
            timing = _latency(lambda f=fn, x=x: f(x), max(20, args.repeats // 10))
            quality = float(np.mean([dice(m, y) for m, y in zip(masks[name], truth)]))
            agreement = float(np.mean([dice(m, t) for m, t in zip(masks[name], tf_masks)]))
            out.append(("unet3d", name, batch, *timing, quality, agreement))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ctr-steps", type=int, default=300)
    parser.add_argument("--unet-steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-quantized-"))
    try:
        rows = _ctr(root, args) + _unet(root, args)
        sizes = {
            name: {k: (root / name / "tflite" / f"{k}.tflite").stat().st_size for k in ("float32", "int8")}
            for name in ("ctr", "unet")
        }
        ops = {
            name: json.loads((root / name / "tflite" / "export.json").read_text()) for name in ("ctr", "unet")
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print("\nfloat vs int8 (latency ms; quality: AUC for ctr, Dice vs the label for unet3d;")
    print(
        "vs TF: largest |probability - SavedModel's| for ctr, Dice of the mask with the SavedModel's for unet3d)"
    )
    print(
        f"{'model':7} {'runtime':22} {'batch':>5} {'p50':>8} {'p99':>8} {'quality':>8} {'vs TF':>8} {'p50 / float':>12}"
    )
    base = {}
    for model, name, batch, p50, p99, quality, versus in rows:
        kind = "int8" if "int8" in name else "float32" if "float32" in name else "tf"
        key = (model, batch, name.replace(kind, "").strip())
        if kind == "float32":
            base[key] = p50
        ratio = f"{p50 / base[key]:11.2f}x" if kind == "int8" and key in base else ""
        q = f"{quality:8.4f}" if quality is not None else ""
        v = f"{versus:8.4f}" if versus is not None else ""
        print(f"{model:7} {name:22} {batch:5d} {p50:8.3f} {p99:8.3f} {q:>8} {v:>8} {ratio:>12}")
    for name, s in sizes.items():
        print(
            f"{name}: float32 {s['float32'] / 1e6:.2f} MB, int8 {s['int8'] / 1e6:.2f} MB; ops left float in int8:",
            end=" ",
        )
        print(ops[name]["files"]["int8.tflite"]["float_ops"])


if __name__ == "__main__":
    sys.exit(main())
