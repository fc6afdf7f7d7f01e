"""``headrace demo``: the main job. Runs every pipeline and trainer that exists on small embedded data.

Pipelines run on the in-process FnApiRunner, trainers on an 8-device virtual CPU mesh (GPUs when present),
and the demo prints one summary line per stage with its figures. It must finish in under 10 minutes on a
2-core machine; each stage is sized for that (`FULL`). `SMALL` runs the same stages on a fraction of the
data (``headrace demo --small``, and the test of the demo).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from headrace.core.errors import InputError

__all__ = ["FULL", "MARKER", "SMALL", "Sizes", "prepare_workdir", "run_demo"]

_log = logging.getLogger("headrace.demo")

MESH = "batch=4,model=2"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much data and training each stage gets."""

    example_records: int = 20_000
    mlp_steps: int = 300
    crowd_tasks: int = 3000
    crowd_iterations: int = 30
    classifier_epochs: int = 8
    ctr_lines: int = 200_000
    ct_depth: int = 48
    ct_side: int = 96
    unet_steps: int = 60
    resnet_epochs: int = 6
    resnet_width: int = 32
    lm_steps: int = 150
    omni_repeats: int = 2
    omni_steps: int = 150


FULL = Sizes()
SMALL = Sizes(
    example_records=4000,
    mlp_steps=60,
    crowd_tasks=600,
    crowd_iterations=8,
    classifier_epochs=2,
    ctr_lines=30_000,
    ct_depth=24,
    ct_side=48,
    unet_steps=8,
    resnet_epochs=1,
    resnet_width=8,
    lm_steps=10,
    omni_repeats=1,
    omni_steps=10,
)


def _example(workdir: Path, sizes: Sizes) -> tuple[str, str]:
    from headrace.pipelines.example import ExampleConfig, build_example
    from headrace.runners.beam_runner import run_pipeline

    config = ExampleConfig(output=str(workdir / "example"), num_records=sizes.example_records)
    result = run_pipeline(build_example, config, overwrite=True)
    r = json.loads((result.output / "report.json").read_text())
    return (
        "run example (FnApiRunner)",
        f"{r['read']} read = {r['train']} train + {r['eval']} eval + {r['rejected']} rejected "
        f"in {result.seconds:.1f}s",
    )


def _mlp(workdir: Path, sizes: Sizes) -> tuple[str, str]:
    from headrace.models import metrics
    from headrace.pipelines.example import EXAMPLE_SPEC, planted_probability
    from headrace.runners.train_mlp import MLPTrainConfig, train_and_evaluate
    from headrace.transforms.tfrecord import read_examples

    data = workdir / "example"
    m = train_and_evaluate(
        MLPTrainConfig(data=str(data), output=str(workdir / "mlp"), mesh=MESH, steps=sizes.mlp_steps)
    )
    evals = list(read_examples(str(data / "eval-*.tfrecord"), EXAMPLE_SPEC))
    bayes = metrics.auc(
        [int(e["label"]) for e in evals],
        [planted_probability(e["dense"], e["tokens"]) for e in evals],
    )
    return (
        f"train mlp ({m['device_type']} mesh {MESH})",
        f"eval AUC {m['auc']:.3f} (planted model {bayes:.3f}), loss {m['loss_first']:.3f} -> "
        f"{m['loss_last']:.3f}, {m['examples_per_sec']:,.0f} ex/s",
    )


def _crowd(workdir: Path, sizes: Sizes) -> tuple[str, str]:
    from headrace.pipelines.crowd import CrowdConfig, build_crowd_labels
    from headrace.pipelines.crowd_data import generate
    from headrace.runners.beam_runner import run_pipeline

    n = sizes.crowd_tasks
    data = generate(workdir / "crowd-data", num_tasks=n, num_workers=n, labels_per_task=5, seed=7)
    acc, seconds = {}, 0.0
    for method in ("majority_vote", "dawid_skene", "groupanno"):
        result = run_pipeline(
            build_crowd_labels,
            CrowdConfig(
                annotations=data.annotations,
                annotators=data.annotators,
                tasks=data.tasks,
                truth=data.truth,
                output=str(workdir / f"crowd-{method}"),
                method=method,
                iterations=sizes.crowd_iterations,
            ),
        )
        seconds += result.seconds
        acc[method] = json.loads((result.output / "report.json").read_text())["truth"]["accuracy"]
    return (
        "run crowd-labels (FnApiRunner)",
        f"{data.num_annotations:,} labels, ~5 per worker, 3 biased groups: accuracy MV {acc['majority_vote']:.3f}, "
        f"DS {acc['dawid_skene']:.3f}, GroupAnno {acc['groupanno']:.3f} ({seconds:.1f}s)",
    )


def _crowd_classifier(workdir: Path, sizes: Sizes) -> tuple[str, str]:
    from headrace.runners.train_crowd_classifier import CrowdClassifierConfig, train_and_evaluate

    m = train_and_evaluate(
        CrowdClassifierConfig(
            data=str(workdir / "crowd-groupanno"),
            output=str(workdir / "crowd-classifier"),
            mesh=MESH,
            epochs=sizes.classifier_epochs,
        )
    )
    return (
        f"train crowd-classifier ({m['device_type']} mesh {MESH})",
        f"held-out accuracy {m['accuracy_vs_truth']:.3f} vs truth ({m['eval_tasks']} tasks; "
        f"GroupAnno labels there {m['aggregated_accuracy_vs_truth']:.3f}), {m['examples_per_sec']:,.0f} ex/s",
    )


def _ctr_ingest(workdir: Path, sizes: Sizes) -> tuple[str, str]:
    from headrace.pipelines.ctr import CtrIngestConfig, build_ctr_ingest
    from headrace.pipelines.ctr_data import generate
    from headrace.runners.beam_runner import run_pipeline

    log = generate(
        workdir / "ctr-log" / "day0.tsv.gz",
        sizes.ctr_lines,
        seed=0,
        malformed_every=sizes.ctr_lines // 10,
        compress=True,
    )
    result = run_pipeline(
        build_ctr_ingest, CtrIngestConfig(input=log.path, output=str(workdir / "ctr"), min_count=5)
    )
    r = json.loads((result.output / "report.json").read_text())
    stats = json.loads((result.output / "stats.json").read_text())["fields"]
    kept = sum(stats[f"C{i}"]["kept"] for i in range(1, 27))
    distinct = sum(stats[f"C{i}"]["distinct"] for i in range(1, 27))
    return (
        "run ctr-ingest (FnApiRunner)",
        f"{r['read']:,} lines = {r['train']:,} train + {r['eval']:,} eval + {r['rejected']} rejected; "
        f"{kept:,} of {distinct:,} categorical values seen >= 5 times; "
        f"{r['read'] / result.seconds:,.0f} lines/s",
    )


def _ctr_train(workdir: Path, sizes: Sizes) -> tuple[str, str]:
    import numpy as np

    from headrace.models import metrics
    from headrace.pipelines import ctr
    from headrace.pipelines.ctr_data import planted_probability, raw_columns
    from headrace.runners.train_ctr import CTRTrainConfig, train_and_evaluate

    data = str(workdir / "ctr")
    m = train_and_evaluate(
        CTRTrainConfig(data=data, output=str(workdir / "ctr-deepfm"), model="deepfm", mesh=MESH, min_count=2)
    )
    ys, ps = [], []
    for b in ctr.dataset(data, "eval", 4096):
        b = {k: v.numpy() for k, v in b.items()}
        ys.append(b["label"])
        ps.append(planted_probability(raw_columns(b)))
    bayes = metrics.auc(np.concatenate(ys), np.concatenate(ps))
    return (
        f"train ctr deepfm ({m['mesh']})",
        f"eval AUC {m['auc']:.4f} (planted model {bayes:.4f}) after one epoch, {m['table_rows_used']:,} rows, "
        f"{m['ids_filtered']:,} ids filtered, {m['examples_per_sec']:,.0f} ex/s; SavedModel exported",
    )


def _ct_ingest(workdir: Path, sizes: Sizes) -> tuple[str, str]:
    import numpy as np

    from headrace.pipelines import ct_data
    from headrace.pipelines.ct import CtIngestConfig, build_ct_ingest
    from headrace.runners.beam_runner import run_pipeline

    src = workdir / "ct-raw"
    for k in range(
        3
    ):  # three DICOM series (slope/intercept, shuffled file names), one with a duplicate slice
        hu = ct_data.phantom((sizes.ct_depth, sizes.ct_side, sizes.ct_side), seed=k).hu
        positions = None if k < 2 else [float(i - (i == 10)) * 2.5 for i in range(sizes.ct_depth)]
        ct_data.write_dicom_series(src / f"patient{k}", hu, seed=k, slope=0.5, positions=positions)
    for k in range(3):  # three labelled NIfTI cases for the U-Net
        depth = sizes.ct_depth * 5 // 6
        ph = ct_data.phantom((depth, sizes.ct_side, sizes.ct_side), seed=9 + k, lesion_radius=0.3)
        ct_data.write_nifti(src / "nifti" / f"case{k}.nii.gz", ph.hu)
        ct_data.write_nifti(src / "nifti" / f"case{k}_label.nii.gz", ph.label, dtype=np.uint8)
    (src / "patient0" / "notes.txt").write_text("not a DICOM file")
    result = run_pipeline(
        build_ct_ingest,
        CtIngestConfig(
            input=str(src), output=str(workdir / "ct"), spacing=(2.0, 1.0, 1.0), block_above_mb=1.0
        ),
    )
    r = json.loads((result.output / "report.json").read_text())
    return (
        "run ct-ingest (FnApiRunner)",
        f"{r['files']} files -> {r['volumes']} volumes ({r['labelled']} labelled, {r['blocks']} blocks) "
        f"resampled to 2x1x1 mm + {r['rejected']} rejected {sorted(r['rejected_reasons'])}; "
        f"{r['voxels'] / 1e6:.1f}M voxels in {result.seconds:.1f}s; previews in ct/previews/",
    )


def _unet3d(workdir: Path, sizes: Sizes) -> tuple[str, str]:
    from headrace.runners.train_unet3d import UNet3DTrainConfig, train_and_evaluate

    m = train_and_evaluate(
        UNet3DTrainConfig(
            data=str(workdir / "ct"),
            output=str(workdir / "unet3d"),
            partitions=4,
            steps=sizes.unet_steps,
            patch=(16, 48, 48),
            channels=8,
            learning_rate=3e-3,
        )
    )
    return (
        "train unet3d (4 spatial partitions)",
        f"loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}, held-out Dice {m['dice']:.3f} "
        f"({m['held_out_volumes']} volume), {m['peak_bytes_per_device'] / 2**20:.0f} MB per device, "
        f"{m['voxels_per_sec']:,.0f} voxels/s; {m['unlabelled_skipped']} unlabelled skipped",
    )


def _image_ingest(workdir: Path, sizes: Sizes) -> tuple[str, str]:
    from headrace.pipelines.images import ImageIngestConfig, build_image_ingest
    from headrace.pipelines.images_data import write_digits
    from headrace.runners.beam_runner import run_pipeline

    write_digits(workdir / "digits-png")
    config = ImageIngestConfig(input=str(workdir / "digits-png"), output=str(workdir / "digits"))
    result = run_pipeline(build_image_ingest, config)
    r = json.loads((result.output / "report.json").read_text())
    return (
        "run image-ingest (FnApiRunner)",
        f"scikit-learn's digits: {r['files']} PNGs = {r['train']} train + {r['eval']} eval + "
        f"{r['rejected']} rejected, {r['classes']} classes as JPEG; samples in digits/samples.png",
    )


def _resnet(workdir: Path, sizes: Sizes) -> tuple[str, str]:
    from headrace.runners.train_resnet import resnet_digits, train_and_evaluate

    config = dataclasses.replace(
        resnet_digits(),
        data=str(workdir / "digits"),
        output=str(workdir / "resnet"),
        mesh="batch=8",
        bn_group_size=2,
        width=sizes.resnet_width,
        epochs=sizes.resnet_epochs,
    )
    m = train_and_evaluate(config)
    return (
        "train resnet-18 (batch=8, BN groups of 2)",
        f"digits eval top-1 {m['top1']:.3f} after {m['steps']} steps, {m['images_per_sec']:,.0f} images/s "
        f"({m['input_wait_seconds_per_step'] * 1000:.0f} ms input wait per step); curves.png, augmented.png",
    )


def _lm(workdir: Path, sizes: Sizes) -> tuple[str, str]:
    """Licence texts the installed packages ship -> packed rows -> a talking-heads Transformer -> text."""
    import contextlib
    import io
    import sysconfig

    from headrace.pipelines.text import TextIngestConfig, build_text_ingest
    from headrace.runners.beam_runner import run_pipeline
    from headrace.runners.generate_lm import GenerateConfig, generate
    from headrace.runners.train_lm import LMTrainConfig, train_and_evaluate

    site = sysconfig.get_paths()["purelib"]
    config = TextIngestConfig(
        input=f"{site}/*.dist-info/**LICEN*", output=str(workdir / "text"), vocab_size=512
    )
    result = run_pipeline(build_text_ingest, config)
    r = json.loads((result.output / "report.json").read_text())
    m = train_and_evaluate(
        LMTrainConfig(data=str(result.output), output=str(workdir / "lm"), mesh=MESH, steps=sizes.lm_steps)
    )
    with contextlib.redirect_stdout(io.StringIO()):
        g = generate(
            GenerateConfig(model=str(workdir / "lm"), prompt="Permission is", max_tokens=16, temperature=0)
        )
    return (
        "text-ingest + train lm (talking-heads, batch=4,model=2)",
        f"{r['documents']} licence files, {r['tokens']:,} tokens; eval perplexity {m['perplexity']:.1f} "
        f"after {m['steps']} steps, {m['tokens_per_sec']:,.0f} tokens/s; "
        f"generate 'Permission is' -> {g['text'][:40]!r}",
    )


def _omni(workdir: Path, sizes: Sizes) -> tuple[str, str]:
    """Speech, photographs and videos made here -> one token stream -> the talking-heads decoder -> a
    spoken question answered in text, audio (answer.wav) and a picture (answer.png)."""
    import contextlib
    import io

    from headrace.pipelines.omni import OmniIngestConfig, build_omni_ingest
    from headrace.pipelines.omni_data import espeak_available, write_manifest
    from headrace.runners.beam_runner import run_pipeline
    from headrace.runners.generate_omni import OmniGenerateConfig, generate
    from headrace.runners.train_omni import OmniTrainConfig, train_and_evaluate

    title = "omni-ingest + train omni + generate (talking-heads)"
    if not espeak_available():
        return title, "skipped: espeak-ng is not installed (make media-deps)"
    manifest = write_manifest(workdir / "omni-media", repeats=sizes.omni_repeats, videos=2)
    config = OmniIngestConfig(
        input=str(manifest), output=str(workdir / "omni"), codebook_size=128, seq_len=256
    )
    result = run_pipeline(build_omni_ingest, config)
    r = json.loads((result.output / "report.json").read_text())
    _log.info("demo: omni-ingest %.1fs", result.seconds)
    model = workdir / "omni-model"
    m = train_and_evaluate(
        OmniTrainConfig(
            data=str(result.output), output=str(model), mesh=MESH, steps=sizes.omni_steps, batch_size=8,
            d_model=64, ffn=128, learning_rate=0.01,
        )
    )  # fmt: skip
    wav = str(manifest.parent / "media" / "cat-0.wav")
    answers = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for kind in ("text", "audio", "image"):
            answers[kind] = generate(
                OmniGenerateConfig(
                    model=str(model), prompt_audio=wav, respond_with=kind, temperature=0,
                    output=str(workdir / "omni-answers" / kind),
                )
            )  # fmt: skip
    parts = ", ".join(f"{r['parts'][k]} {k}" for k in ("text", "audio", "image", "video"))
    return (
        title,
        f"{r['examples']} examples ({parts}) -> {r['total_tokens']:,} tokens; eval perplexity "
        f"{m['perplexity']:.1f} after {m['steps']} steps, {m['tokens_per_sec']:,.0f} tokens/s; spoken "
        f"'a cat sitting on a chair' -> text {answers['text']['text'][:24]!r} (first token "
        f"{answers['text']['time_to_first_token_s'] * 1000:.0f} ms), audio (first audio "
        f"{answers['audio']['time_to_first_audio_s'] * 1000:.0f} ms), image; in omni-answers/",
    )


STAGES: list[tuple[str, Callable[[Path, Sizes], tuple[str, str]]]] = [
    ("example", _example),
    ("mlp", _mlp),
    ("crowd-labels", _crowd),
    ("crowd-classifier", _crowd_classifier),
    ("ctr-ingest", _ctr_ingest),
    ("ctr-train", _ctr_train),
    ("ct-ingest", _ct_ingest),
    ("unet3d", _unet3d),
    ("image-ingest", _image_ingest),
    ("resnet", _resnet),
    ("lm", _lm),
    ("omni", _omni),
]


MARKER = ".headrace-demo"


def prepare_workdir(workdir: str, *, overwrite: bool = False) -> Path:
    """The demo's directory, emptied. A directory the demo made holds `MARKER` and is replaced; any other
    non-empty one is refused (it may hold someone's data) unless `overwrite`."""
    root = Path(workdir).absolute()
    if root.exists():
        if not root.is_dir():
            raise InputError(f"--workdir {workdir}: exists and is not a directory")
        ours = (root / MARKER).is_file()
        if not ours and any(root.iterdir()) and not overwrite:
            raise InputError(
                f"--workdir {workdir}: not empty and not made by `headrace demo` (no {MARKER} file); "
                "choose another directory or pass --overwrite to replace it"
            )
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("made by `headrace demo`; the next demo run replaces this directory\n")
    return root


def run_demo(workdir: str, sizes: Sizes = FULL, *, overwrite: bool = False) -> int:
    from headrace.core import mesh as mesh_lib

    root = prepare_workdir(workdir, overwrite=overwrite)
    # Before anything starts TensorFlow's runtime. BFC: unet3d measures its peak memory per device.
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    mesh_lib.configure_virtual_devices(8)
    rows, failed = [], []
    start = time.perf_counter()
    for name, stage in STAGES:
        t = time.perf_counter()
        _log.info("demo: %s", name)
        try:
            label, figures = stage(root, sizes)
        except Exception as exc:  # the demo reports every stage, then fails
            _log.exception("demo stage %s failed", name)
            label, figures = name, f"FAILED: {exc}"
            failed.append(name)
        rows.append((label, figures, time.perf_counter() - t))
    width = max(len(r[0]) for r in rows)
    print(f"\nheadrace demo: outputs in {root}")
    for label, figures, seconds in rows:
        print(f"  {label:<{width}}  {seconds:6.1f}s  {figures}")
    print(f"  {'total':<{width}}  {time.perf_counter() - start:6.1f}s")
    return 1 if failed else 0
