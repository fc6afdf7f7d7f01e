"""``headrace run ct-ingest``: a folder of DICOM series and NIfTI files -> sharded HU volumes in TFRecords.

    headrace run ct-ingest --input DIR --output OUT [--spacing Z,Y,X] [--hu-window LO,HI] [--shards N]
        [--block-above-mb MB] [--block D,H,W] [--halo N] [--runner R]

Structure (volumes never travel through the runner: each is built, written and previewed by the worker
that read it, and only file names and manifest lines are shuffled):

    list DIR recursively -> Inspect every file: NIfTI by extension, anything else read as a DICOM header
        DICOM headers -> GroupByKey(SeriesInstanceUID) -> validate geometry, read and stack slices in HU
        NIfTI files -> GroupByKey(stem, pairing NAME_label with NAME) -> read, check label geometry
      -> reorient to [D, H, W], resample (--spacing), clip (--hu-window)
      -> one TFRecord part per volume (and per blocked volume) in OUT/.work, a preview PNG
    parts -> ConcatShards -> volumes-SSSSS-of-NNNNN.tfrecord (blocks-... likewise), spec.json
    manifest lines -> manifest.jsonl (sorted by id), report.json (every input file counted once)

DICOM (`headrace.transforms.dicom`): slices ordered along the slice normal, stored values rescaled to HU,
a series rejected with the files named when its slices do not form one regular grid; a file that is not
DICOM, or lacks the geometry attributes, is rejected alone with the attribute named. NIfTI
(`headrace.transforms.nifti`): ``NAME_label.nii[.gz]`` is the segmentation of ``NAME.nii[.gz]``, on the
same grid. Both end on the axes of `headrace.transforms.volume`: D inferior->superior, H
anterior->posterior, W right->left.

Records: `VOLUME_SPEC` and `BLOCK_SPEC`, whose arrays (the volume in float32, the label in uint8) carry
their dtype and take their shape from the record's ``shape`` feature; `dataset` reads them back.

Volumes whose float32 size exceeds ``--block-above-mb`` are also written as overlapping blocks (cores of
``--block`` voxels tiling the volume, each with ``--halo`` voxels of context on every side) to
``blocks-*.tfrecord``, one block in memory at a time beside the volume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError, InputError
from headrace.core.outputs import WORK_DIR
from headrace.pipelines.ct_pairs import LabelPairs, read_label_pairs, unused_labels
from headrace.pipelines.ct_pairs import file_id as _file_id
from headrace.pipelines.ct_pairs import manifest_line as _manifest
from headrace.transforms.dicom import read_dicom_series, read_header, series_corners
from headrace.transforms.io import WriteJson, match_files
from headrace.transforms.nifti import nifti_stem, pair, read_label_on, read_nifti
from headrace.transforms.patches import sample_patches
from headrace.transforms.preview import write_preview
from headrace.transforms.tfrecord import (
    ConcatShards,
    Feature,
    FeatureSpec,
    WriteSpec,
    example_chunks,
    list_shards,
    read_spec,
    write_record_chunks,
)
from headrace.transforms.volume import GeometryError, iter_blocks, resample

__all__ = [
    "BLOCK_SPEC",
    "VOLUME_SPEC",
    "CtIngestConfig",
    "block_dataset",
    "build_ct_ingest",
    "dataset",
    "patch_dataset",
    "read_manifest",
    "volume_dataset",
]

_log = logging.getLogger(__name__)

VOLUME_SPEC = FeatureSpec(
    "ct_volume",
    {
        "id": Feature("bytes", description="SeriesInstanceUID, or the NIfTI file stem"),
        "volume": Feature.array("float32", "shape", description="[D, H, W], HU for CT"),
        "shape": Feature("int64", (3,), description="D, H, W"),
        "spacing": Feature("float32", (3,), description="z, y, x in mm"),
        "label": Feature.array("uint8", "shape", optional=True, description="[D, H, W] label map, if any"),
    },
)

BLOCK_SPEC = FeatureSpec(
    "ct_block",
    {
        "id": Feature("bytes", description="the volume's id"),
        "index": Feature("int64", (3,), description="block grid index"),
        "start": Feature("int64", (3,), description="block region start in volume voxels"),
        "core_start": Feature("int64", (3,), description="core start inside the block"),
        "core_stop": Feature("int64", (3,), description="core stop inside the block"),
        "volume_shape": Feature("int64", (3,), description="D, H, W of the whole volume"),
        "volume": Feature.array("float32", "shape", description="the block's voxels"),
        "shape": Feature("int64", (3,), description="the block's D, H, W (core + halo, clipped)"),
        "spacing": Feature("float32", (3,)),
        "label": Feature.array("uint8", "shape", optional=True, description="the block's labels, if any"),
    },
)


@dataclasses.dataclass(frozen=True)
class CtIngestConfig:
    input: str = dataclasses.field(
        default="", metadata={"help": "folder of DICOM and NIfTI files (any nesting)", "required": True}
    )
    output: str = dataclasses.field(
        default="", metadata={"help": "output folder (or gs:// prefix)", "required": True}
    )
    spacing: tuple[float, float, float] | None = dataclasses.field(
        default=None, metadata={"help": "resample to Z,Y,X mm (trilinear images, nearest labels)"}
    )
    hu_window: tuple[float, float] | None = dataclasses.field(
        default=None, metadata={"help": "clip values to LO,HI after resampling"}
    )
    shards: int = 4
    block_above_mb: float = dataclasses.field(
        default=64.0, metadata={"help": "also write volumes larger than this (float32 MB) as blocks"}
    )
    block: tuple[int, int, int] = (128, 128, 128)
    halo: int = 16
    previews: bool = True
    labels: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "CSV image,label (paths under --input) pairing label maps that do not follow "
            "NAME_label.nii[.gz]; image: a NIfTI file, or a folder holding one DICOM series"
        },
    )


@config_lib.register("ct-ingest", command="run ct-ingest")
def ct_ingest() -> CtIngestConfig:
    """DICOM / NIfTI -> HU volumes at their own spacing, 4 shards, blocks for volumes over 64 MB."""
    return CtIngestConfig()


@config_lib.register("ct-ingest-1mm", command="run ct-ingest")
def ct_ingest_1mm() -> CtIngestConfig:
    """As ct-ingest, resampled to 1.5 x 1 x 1 mm and clipped to the -1000..1000 HU window."""
    return CtIngestConfig(spacing=(1.5, 1.0, 1.0), hu_window=(-1000.0, 1000.0))


# -------------------------------------------------------------------------------------------------
# Inspecting files
# -------------------------------------------------------------------------------------------------


class _Inspect(beam.DoFn):
    DICOM, NIFTI, REJECTED = "dicom", "nifti", "rejected"

    def __init__(self, root: str, pairs: LabelPairs):
        self._root = root
        self._pairs = pairs
        self._inspected = beam.metrics.Metrics.counter("ct", "files_inspected")
        self._rejected = beam.metrics.Metrics.counter("ct", "files_rejected")

    def process(self, path: str):
        self._inspected.inc()
        name = path.rsplit("/", 1)[-1]
        stem = nifti_stem(name)
        if path in self._pairs.dicom_label_files:
            return  # the label of a DICOM series: read (and accounted for) with that series
        if path in self._pairs.nifti_images:
            yield beam.pvalue.TaggedOutput(self.NIFTI, (self._pairs.nifti_images[path], ("label", path)))
            return
        if stem is not None:
            if stem.endswith("_label"):
                yield beam.pvalue.TaggedOutput(self.NIFTI, (stem[: -len("_label")], ("label", path)))
            else:
                yield beam.pvalue.TaggedOutput(self.NIFTI, (stem, ("image", path)))
            return
        try:
            header = read_header(path)
        except GeometryError as exc:
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(
                self.REJECTED,
                _manifest(_file_id(path, self._root), [path], "rejected", f"{path}: {exc}", kind=exc.kind),
            )
            return
        yield beam.pvalue.TaggedOutput(self.DICOM, header)


# -------------------------------------------------------------------------------------------------
# Building volumes
# -------------------------------------------------------------------------------------------------


def shard_of(id_: str, shards: int) -> int:
    """The output shard of a volume: a stable hash of its id."""
    return int.from_bytes(hashlib.sha1(id_.encode()).digest()[:8], "big") % shards


class _Finish(beam.DoFn):
    """Reads a DICOM series or NIfTI pair and writes everything that depends on its voxels."""

    VOLUME_PARTS, BLOCK_PARTS = "volume_parts", "block_parts"

    def __init__(self, config: CtIngestConfig, kind: str, pairs: LabelPairs):
        self._config = config
        self._kind = kind
        self._pairs = pairs
        self._work = f"{config.output}/{WORK_DIR}"
        self._written = beam.metrics.Metrics.counter("ct", "volumes_written")
        self._rejected = beam.metrics.Metrics.counter("ct", "volumes_rejected")
        self._voxels = beam.metrics.Metrics.counter("ct", "voxels_written")
        self._blocks = beam.metrics.Metrics.counter("ct", "blocks_written")

    def process(self, element):
        key, members = element
        members = list(members)
        id_ = key
        label_path = None
        if self._kind == "dicom":
            sources = [h.path for h in members]
            folders = {p.rsplit("/", 1)[0] for p in sources}
            if len(folders) == 1 and next(iter(folders)) in self._pairs.dicom_labels:
                label_path = self._pairs.dicom_labels[next(iter(folders))]
                sources.append(label_path)
        else:
            sources = [p for _, p in members]
        try:
            if self._kind == "dicom":
                volume, spacing = read_dicom_series(members)
                label = None
                if label_path is not None:
                    tolerance = 0.25 * min(spacing)
                    label = read_label_on(label_path, volume.shape, series_corners(members), tolerance)
            else:
                image, label_path = pair(key, members)
                volume, label, spacing = read_nifti(image, label_path)
        except GeometryError as exc:
            self._rejected.inc()
            yield _manifest(id_, sources, "rejected", str(exc), kind=exc.kind)
            return
        yield from self._write(id_, sources, volume, label, spacing)

    def _write(self, id_, sources, volume, label, spacing):
        config = self._config
        if config.spacing is not None:
            volume = resample(volume, spacing, config.spacing, order=1)
            if label is not None:
                label = resample(label, spacing, config.spacing, order=0)
            spacing = tuple(float(s) for s in config.spacing)
        if config.hu_window is not None:
            np.clip(volume, config.hu_window[0], config.hu_window[1], out=volume)
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        shard = shard_of(id_, config.shards)
        digest = hashlib.sha1(id_.encode()).hexdigest()
        record = {
            "id": id_.encode(),
            "volume": volume,
            "shape": list(volume.shape),
            "spacing": list(spacing),
        }
        if label is not None:
            record["label"] = np.ascontiguousarray(label, dtype=np.uint8)
        part = f"{self._work}/volumes/{digest}.tfrecord"
        with FileSystems.create(part) as f:
            write_record_chunks(f, example_chunks(VOLUME_SPEC, record))
        yield beam.pvalue.TaggedOutput(self.VOLUME_PARTS, (shard, part))

        blocks = 0
        if volume.nbytes > config.block_above_mb * 2**20:
            part = f"{self._work}/blocks/{digest}.tfrecord"
            with FileSystems.create(part) as f:
                for block, view in iter_blocks(volume, config.block, config.halo):
                    rec = {
                        "id": id_.encode(),
                        "index": list(block.index),
                        "start": list(block.start),
                        "core_start": list(block.core_start),
                        "core_stop": list(block.core_stop),
                        "volume_shape": list(volume.shape),
                        "volume": np.ascontiguousarray(view),  # this block's copy only
                        "shape": list(block.shape),
                        "spacing": list(spacing),
                    }
                    if label is not None:
                        rec["label"] = np.ascontiguousarray(label[block.slices])
                    write_record_chunks(f, example_chunks(BLOCK_SPEC, rec))
                    blocks += 1
            self._blocks.inc(blocks)
            yield beam.pvalue.TaggedOutput(self.BLOCK_PARTS, (shard, part))

        if config.previews:
            write_preview(f"{config.output}/previews/{_safe(id_)}.png", volume, label, spacing, id_)
        self._written.inc()
        self._voxels.inc(volume.size)
        yield _manifest(
            id_,
            sources,
            "ok",
            shape=list(volume.shape),
            spacing=[round(s, 6) for s in spacing],
            format=self._kind,
            label=label is not None,
            blocks=blocks,
            min=float(volume.min()),
            max=float(volume.max()),
        )


def _safe(id_: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in id_)


# -------------------------------------------------------------------------------------------------
# Shards, manifest, report
# -------------------------------------------------------------------------------------------------


def _write_manifest(lines: list[dict], path: str) -> None:
    with FileSystems.create(path) as f:
        for line in sorted(lines, key=lambda r: (r["id"], r["sources"])):
            f.write((json.dumps(line, sort_keys=False) + "\n").encode())


def files_digest(paths: Iterable[str]) -> tuple[int, int]:
    """(count, order-independent 64-bit checksum) of a multiset of paths: two equal digests mean the
    manifest holds every input file exactly once, without shipping the file list into the pipeline."""
    total, n = 0, 0
    for p in paths:
        total = (total + int.from_bytes(hashlib.sha1(p.encode()).digest()[:8], "big")) % 2**64
        n += 1
    return n, total


def _report(lines: list[dict], inputs: tuple[int, int], config: CtIngestConfig) -> dict:
    ok = [r for r in lines if r["status"] == "ok"]
    rejected = [r for r in lines if r["status"] != "ok"]
    seen = files_digest(s for r in lines for s in r["sources"])
    if seen != inputs:
        raise RuntimeError(
            f"manifest does not account for every input file once: {seen[0]} sources for {inputs[0]} files"
        )
    by_kind: dict[str, int] = {}
    for r in rejected:
        by_kind[r.get("kind", "rejected")] = by_kind.get(r.get("kind", "rejected"), 0) + 1
    return {
        "files": inputs[0],
        "files_in_volumes": sum(len(r["sources"]) for r in ok),
        "files_rejected": sum(len(r["sources"]) for r in rejected),
        "volumes": len(ok),
        "rejected": len(rejected),
        "labelled": sum(bool(r.get("label")) for r in ok),
        "dicom_series": sum(r.get("format") == "dicom" for r in ok),
        "nifti_volumes": sum(r.get("format") == "nifti" for r in ok),
        "voxels": int(sum(np.prod(r["shape"]) for r in ok)),
        "blocks": sum(r.get("blocks", 0) for r in ok),
        "shards": config.shards,
        "rejected_reasons": dict(sorted(by_kind.items())),
    }


def list_inputs(directory: str) -> list[str]:
    """Every file under `directory`, recursively (checked when the pipeline is built)."""
    root = directory.rstrip("/")
    if "://" not in root and not os.path.isdir(root):
        raise InputError(f"--input {directory}: not a directory")
    return match_files(f"{root}/**", flag="--input")


def _check(config: CtIngestConfig) -> None:
    if not config.input:
        raise ConfigError("--input is required")
    if config.shards < 1:
        raise ConfigError(f"--shards {config.shards}: must be >= 1")
    if config.spacing is not None and min(config.spacing) <= 0:
        raise ConfigError(f"--spacing {config.spacing}: every spacing must be > 0 mm")
    if config.hu_window is not None and config.hu_window[0] >= config.hu_window[1]:
        raise ConfigError(f"--hu-window {config.hu_window}: LO must be below HI")
    if min(config.block) < 1 or config.halo < 0:
        raise ConfigError(f"--block {config.block} / --halo {config.halo}: block >= 1, halo >= 0")


def build_ct_ingest(pipeline: beam.Pipeline, config: CtIngestConfig) -> dict:
    _check(config)
    out = config.output.rstrip("/")
    root = config.input.rstrip("/")
    files = list_inputs(root)
    pairs = read_label_pairs(config.labels, root, files)
    inspected = (
        pipeline
        | "ListFiles" >> beam.Create(files)
        | "Spread" >> beam.Reshuffle()
        | "Inspect"
        >> beam.ParDo(_Inspect(root, pairs)).with_outputs(_Inspect.DICOM, _Inspect.NIFTI, _Inspect.REJECTED)
    )
    dicom = (
        inspected[_Inspect.DICOM]
        | "BySeries" >> beam.GroupByKey()
        | "DicomVolumes"
        >> beam.ParDo(_Finish(config, "dicom", pairs)).with_outputs(
            _Finish.VOLUME_PARTS, _Finish.BLOCK_PARTS, main="lines"
        )
    )
    nifti = (
        inspected[_Inspect.NIFTI]
        | "ByStem" >> beam.GroupByKey()
        | "NiftiVolumes"
        >> beam.ParDo(_Finish(config, "nifti", pairs)).with_outputs(
            _Finish.VOLUME_PARTS, _Finish.BLOCK_PARTS, main="lines"
        )
    )
    for name, prefix in ((_Finish.VOLUME_PARTS, "volumes"), (_Finish.BLOCK_PARTS, "blocks")):
        # Every volume shard is written, empty or not; block files exist only when a volume was blocked.
        (
            (dicom[name], nifti[name])
            | f"All[{name}]" >> beam.Flatten()
            | f"Write[{name}]"
            >> ConcatShards(f"{out}/{prefix}", config.shards, all_shards=prefix == "volumes")
        )
    pipeline | "WriteSpec" >> WriteSpec(out, {"volumes": VOLUME_SPEC, "blocks": BLOCK_SPEC})

    lines = (
        (inspected[_Inspect.REJECTED], dicom["lines"], nifti["lines"])
        | "AllLines" >> beam.Flatten()
        | "Collect" >> beam.combiners.ToList()
        | "UnusedLabels" >> beam.Map(unused_labels, pairs, root)
    )
    lines | "WriteManifest" >> beam.Map(_write_manifest, f"{out}/manifest.jsonl")
    report = lines | "Report" >> beam.Map(_report, files_digest(files), config)
    report | "WriteReport" >> WriteJson(f"{out}/report.json")
    return {"report": report, "lines": lines}


# -------------------------------------------------------------------------------------------------
# Readers
# -------------------------------------------------------------------------------------------------


def read_manifest(out: str) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """(ids of labelled volumes, ids of unlabelled ones, shape of every volume) from ``OUT/manifest.jsonl``."""
    path = Path(out) / "manifest.jsonl"
    if not path.is_file():
        raise InputError(f"--data {out}: no manifest.jsonl (is it a ct-ingest output?)")
    labelled, unlabelled, shapes = [], [], {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry["status"] != "ok":
            continue
        (labelled if entry.get("label") else unlabelled).append(entry["id"])
        shapes[entry["id"]] = entry["shape"]
    return sorted(labelled), sorted(unlabelled), shapes


_SPECS = {"volumes": VOLUME_SPEC, "blocks": BLOCK_SPEC}


def dataset(
    out: str,
    split: str = "volumes",
    *,
    shuffle: bool = False,
    seed: int | None = None,
    labelled_only: bool = False,
    ids: Sequence[str] | None = None,
    repeat: bool = False,
):
    """The records of ``OUT/{split}-*.tfrecord`` (``volumes`` or ``blocks``), one element each (shapes
    differ, so no batching), arrays decoded by the spec the output declares: ``"volume"`` [D, H, W]
    float32, ``"label"`` [D, H, W] uint8 (zeros when absent), ``"has_label"``, and the other features.
    `ids` keeps only those records, filtered (like `labelled_only`) before the voxels are decoded."""
    import tensorflow as tf

    if split not in _SPECS:
        raise InputError(f"{out}: ct-ingest writes volumes and blocks, not {split!r}")
    spec = read_spec(out, split, _SPECS[split])
    files = list_shards(f"{str(out).rstrip('/')}/{split}-*-of-*.tfrecord")
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=2, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda s: spec.parse_single(s, decode_arrays=False), num_parallel_calls=tf.data.AUTOTUNE)
    if ids is not None:
        wanted = tf.constant(sorted(ids) or [""], tf.string)
        ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(ex["id"], wanted)))
    if labelled_only:
        ds = ds.filter(lambda ex: tf.strings.length(ex["label"]) > 0)
    if shuffle:
        ds = ds.shuffle(16, seed=seed)
    if repeat:
        ds = ds.repeat()
    return ds.map(spec.decode_arrays, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def volume_dataset(out: str, **kwargs):
    """Whole volumes of a ct-ingest output (`dataset` of ``volumes``; the same keyword arguments)."""
    return dataset(out, "volumes", **kwargs)


def block_dataset(out: str, **kwargs):
    """The blocks of the large volumes: like `volume_dataset`, plus index, start, core_start/stop."""
    return dataset(out, "blocks", **kwargs)


def patch_dataset(
    out: str,
    patch: Sequence[int],
    *,
    patches_per_volume: int = 8,
    foreground_fraction: float = 0.5,
    seed: int = 0,
    labelled_only: bool = False,
    shuffle: bool = True,
    ids: Sequence[str] | None = None,
    repeat: bool = False,
):
    """Random [pd, ph, pw] patches of the volumes: ``{"volume", "label", "id", "start", "foreground"}``
    (`headrace.transforms.patches.sample_patches`; deterministic for a given `seed`)."""
    volumes = volume_dataset(
        out, shuffle=shuffle, seed=seed, labelled_only=labelled_only, ids=ids, repeat=repeat
    )
    return sample_patches(
        volumes,
        patch,
        patches_per_volume=patches_per_volume,
        foreground_fraction=foreground_fraction,
        seed=seed,
        shuffle=shuffle,
    )
