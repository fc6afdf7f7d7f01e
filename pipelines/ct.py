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
    parts -> GroupByKey(shard) -> concatenated into volumes-SSSSS-of-NNNNN.tfrecord (blocks-... likewise)
    manifest lines -> manifest.jsonl (sorted by id), report.json (every input file counted once)

DICOM: slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of the
two ImageOrientationPatient vectors), ascending; stored values become HU as ``value * RescaleSlope +
RescaleIntercept`` (float64, then float32); spacing is (distance between slice positions, PixelSpacing).
A series is rejected, with the files named, when slices differ in size, orientation or pixel spacing,
when two slices share a position, when the distance between slices varies by more than 1% (or 0.01 mm),
or when a slice's pixel data cannot be decoded. A file that is not DICOM, or lacks the geometry
attributes, is rejected alone with the attribute named. Multi-frame files are rejected (not supported).

NIfTI: read with nibabel (scaling applied), 4D volumes with a single time point squeezed, others
rejected. ``NAME_label.nii[.gz]`` is the segmentation of ``NAME.nii[.gz]``: same grid (shape and affine),
integer values 0..255. The orientation convention is `headrace.transforms.volume`'s: D inferior->superior,
H anterior->posterior, W right->left, for DICOM and NIfTI alike.

Volumes whose float32 size exceeds ``--block-above-mb`` are also written as overlapping blocks (cores of
``--block`` voxels tiling the volume, each with ``--halo`` voxels of context on every side) to
``blocks-*.tfrecord``, one block in memory at a time beside the volume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from headrace.runners import config as config_lib
from headrace.runners.beam_runner import WORK_DIR
from headrace.runners.errors import ConfigError, InputError
from headrace.transforms.io import WriteJson, match_files
from headrace.transforms.tfrecord import Feature, FeatureSpec, example_chunks, write_record_chunks
from headrace.transforms.volume import (
    GeometryError,
    acquisition_view,
    canonical_axes,
    canonical_shape,
    iter_blocks,
    reorient,
    resample,
)

__all__ = [
    "BLOCK_SPEC",
    "VOLUME_SPEC",
    "CtIngestConfig",
    "SliceHeader",
    "block_dataset",
    "build_ct_ingest",
    "patch_dataset",
    "volume_dataset",
]

_log = logging.getLogger(__name__)

VOLUME_SPEC = FeatureSpec(
    "ct_volume",
    {
        "id": Feature("bytes", description="SeriesInstanceUID, or the NIfTI file stem"),
        "volume": Feature("bytes", description="float32 little-endian, C order [D, H, W], HU for CT"),
        "shape": Feature("int64", (3,), description="D, H, W"),
        "spacing": Feature("float32", (3,), description="z, y, x in mm"),
        "label": Feature("bytes", default=b"", description="uint8 [D, H, W]; b'' when there is no label"),
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
        "volume": Feature("bytes", description="float32 little-endian, C order, the block's shape"),
        "shape": Feature("int64", (3,), description="the block's D, H, W (core + halo, clipped)"),
        "spacing": Feature("float32", (3,)),
        "label": Feature("bytes", default=b"", description="uint8, the block's shape; b'' if unlabelled"),
    },
)


@dataclasses.dataclass(frozen=True)
class CtIngestConfig:
    input: str = dataclasses.field(
        default="", metadata={"help": "folder of DICOM and NIfTI files (any nesting)"}
    )
    output: str = ""
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


@dataclasses.dataclass(frozen=True)
class SliceHeader:
    """The geometry of one DICOM slice, read without its pixels."""

    path: str
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float
    thickness: float | None


_REQUIRED = {
    "SeriesInstanceUID": "(0020,000E)",
    "Rows": "(0028,0010)",
    "Columns": "(0028,0011)",
    "PixelSpacing": "(0028,0030)",
    "ImagePositionPatient": "(0020,0032)",
    "ImageOrientationPatient": "(0020,0037)",
}


def _nifti_stem(name: str) -> str | None:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def _manifest(id_: str, sources: Sequence[str], status: str, reason: str = "", **extra) -> dict:
    return {
        "id": id_,
        "sources": sorted(sources),
        "status": status,
        "reason": reason,
        "shape": extra.pop("shape", None),
        "spacing": extra.pop("spacing", None),
        **extra,
    }


def _file_id(path: str, root: str) -> str:
    return os.path.relpath(path, root) if not path.startswith(("gs://", "s3://")) else path


class _Inspect(beam.DoFn):
    DICOM, NIFTI, REJECTED = "dicom", "nifti", "rejected"

    def __init__(self, root: str):
        self._root = root
        self._inspected = beam.metrics.Metrics.counter("ct", "files_inspected")
        self._rejected = beam.metrics.Metrics.counter("ct", "files_rejected")

    def process(self, path: str):
        self._inspected.inc()
        name = path.rsplit("/", 1)[-1]
        stem = _nifti_stem(name)
        if stem is not None:
            if stem.endswith("_label"):
                yield beam.pvalue.TaggedOutput(self.NIFTI, (stem[: -len("_label")], ("label", path)))
            else:
                yield beam.pvalue.TaggedOutput(self.NIFTI, (stem, ("image", path)))
            return
        try:
            header = self._header(path)
        except GeometryError as exc:
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(
                self.REJECTED,
                _manifest(_file_id(path, self._root), [path], "rejected", f"{path}: {exc}", kind=exc.kind),
            )
            return
        yield beam.pvalue.TaggedOutput(self.DICOM, header)

    @staticmethod
    def _header(path: str) -> tuple[str, SliceHeader]:
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
        except InvalidDicomError as exc:
            raise GeometryError(f"not a DICOM file ({exc})", "not_dicom") from None
        except Exception as exc:  # truncated or garbled files raise anything from struct to KeyError
            raise GeometryError(
                f"unreadable DICOM file ({type(exc).__name__}: {exc})", "unreadable"
            ) from None
        for keyword, tag in _REQUIRED.items():
            if keyword not in ds or ds[keyword].value in (None, ""):
                raise GeometryError(f"missing {keyword} {tag}", "missing_attribute")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise GeometryError(
                f"multi-frame DICOM (NumberOfFrames={frames}) is not supported", "multi_frame"
            )
        try:
            position = tuple(float(v) for v in ds.ImagePositionPatient)
            orientation = tuple(float(v) for v in ds.ImageOrientationPatient)
            pixel_spacing = tuple(float(v) for v in ds.PixelSpacing)
        except (TypeError, ValueError) as exc:
            raise GeometryError(f"unparsable geometry ({exc})", "bad_attribute") from None
        if len(position) != 3 or len(orientation) != 6 or len(pixel_spacing) != 2:
            raise ValueError(
                "ImagePositionPatient needs 3 values, ImageOrientationPatient 6, PixelSpacing 2; got "
                f"{len(position)}, {len(orientation)}, {len(pixel_spacing)}"
            )
        thickness = ds.get("SliceThickness")
        header = SliceHeader(
            path=path,
            position=position,  # type: ignore[arg-type]
            orientation=orientation,  # type: ignore[arg-type]
            pixel_spacing=pixel_spacing,  # type: ignore[arg-type]
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
            intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
            thickness=float(thickness) if thickness not in (None, "") else None,
        )
        return str(ds.SeriesInstanceUID), header


# -------------------------------------------------------------------------------------------------
# Building volumes
# -------------------------------------------------------------------------------------------------


def dicom_geometry(headers: Sequence[SliceHeader]) -> tuple[list[SliceHeader], float, np.ndarray]:
    """``(slices in ascending order along the normal, slice spacing, [3, 3] axis directions)``.

    Raises GeometryError naming the files when the series is not one regular grid.
    """
    # GroupByKey gives the slices in any order: sort by path first, so that ties (duplicate positions)
    # and therefore reasons are the same on every runner.
    headers = sorted(headers, key=lambda h: h.path)
    sizes = {(h.rows, h.columns) for h in headers}
    if len(sizes) > 1:
        raise GeometryError(f"mixed slice sizes {sorted(sizes)} (Rows, Columns)", "mixed_sizes")
    iop = np.array([h.orientation for h in headers])
    if np.abs(iop - iop[0]).max() > 1e-4:
        raise GeometryError("slices differ in ImageOrientationPatient", "mixed_orientation")
    ps = np.array([h.pixel_spacing for h in headers])
    if np.abs(ps - ps[0]).max() > 1e-4:
        raise GeometryError("slices differ in PixelSpacing", "mixed_pixel_spacing")
    row_dir, col_dir = iop[0, :3], iop[0, 3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 0.5:
        raise GeometryError(f"ImageOrientationPatient {iop[0].tolist()} is not two orthogonal unit vectors")
    along = np.array([h.position for h in headers]) @ normal
    order = np.argsort(along, kind="stable")
    ordered = [headers[i] for i in order]
    z = along[order]
    if len(ordered) == 1:
        if not ordered[0].thickness or ordered[0].thickness <= 0:
            raise GeometryError("a single slice without SliceThickness has no slice spacing", "no_spacing")
        spacing = ordered[0].thickness
    else:
        gaps = np.diff(z)
        dup = np.flatnonzero(gaps < 1e-3)
        if dup.size:
            i = int(dup[0])
            raise GeometryError(
                f"duplicate slice position {z[i]:.3f} mm along the normal: "
                f"{ordered[i].path} and {ordered[i + 1].path}",
                "duplicate_slice",
            )
        spread = gaps.max() - gaps.min()
        if spread > max(0.01, 0.01 * float(np.median(gaps))):
            i = int(np.argmax(np.abs(gaps - np.median(gaps))))
            raise GeometryError(
                f"varying slice spacing {gaps.min():.3f}..{gaps.max():.3f} mm "
                f"(gap after {ordered[i].path} is {gaps[i]:.3f} mm)",
                "varying_spacing",
            )
        spacing = float(gaps.mean())
    # Array axes: 0 = slices (along the normal), 1 = rows (down a column: col_dir), 2 = columns (row_dir).
    directions = np.stack([normal, col_dir, row_dir])
    return ordered, spacing, directions


def read_dicom_series(headers: Sequence[SliceHeader]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The series as float32 HU on the [D, H, W] axes, and its spacing (z, y, x)."""
    import pydicom

    ordered, dz, directions = dicom_geometry(headers)
    rows, cols = ordered[0].rows, ordered[0].columns
    acquired = (len(ordered), rows, cols)
    # Allocated once in the final [D, H, W] layout; slices are written through a view in acquisition order.
    volume = np.empty(canonical_shape(acquired, directions), np.float32)
    slices = acquisition_view(volume, directions)
    for k, h in enumerate(ordered):
        try:
            with FileSystems.open(h.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                pixels = pydicom.dcmread(f).pixel_array
        except Exception as exc:  # no PixelData, an undecodable transfer syntax, truncation
            raise GeometryError(
                f"{h.path}: pixel data unreadable ({type(exc).__name__}: {exc})", "bad_pixels"
            ) from None
        if pixels.shape != (rows, cols):
            raise GeometryError(
                f"{h.path}: pixel data has shape {pixels.shape}, header says {(rows, cols)}", "bad_pixels"
            )
        slices[k] = pixels.astype(np.float64) * h.slope + h.intercept
    spacing = (dz, ordered[0].pixel_spacing[0], ordered[0].pixel_spacing[1])
    perm, _ = canonical_axes(directions)
    return volume, tuple(float(spacing[p]) for p in perm)  # type: ignore[return-value]


_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _nifti_grid(img) -> tuple[np.ndarray, tuple[float, ...]]:
    axes = img.affine[:3, :3]
    return (_RAS_TO_LPS @ axes).T, tuple(float(v) for v in np.linalg.norm(axes, axis=0))


def _nifti_array(img, path: str, directions: np.ndarray, spacing, *, label: bool):
    """The image's values on the [D, H, W] axes, converted in one pass from the stored (unscaled,
    possibly memory-mapped) array: float32 with the NIfTI scaling for images, uint8 for labels."""
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise GeometryError(
            f"{path}: shape {img.shape}: only 3D volumes (or 4D with one time point)", "not_3d"
        )
    proxy = img.dataobj
    raw = np.asanyarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy).reshape(shape)
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    view, out_spacing = reorient(raw, spacing, directions, copy=False)
    if label:
        if slope != 1.0 or inter != 0.0 or raw.dtype.kind == "f":
            view = view * slope + inter
            if not np.array_equal(view, np.rint(view)):
                raise GeometryError(f"{path}: label values must be integers", "bad_label")
        lo, hi = view.min(), view.max()
        if lo < 0 or hi > 255:
            raise GeometryError(f"{path}: label values {lo}..{hi} outside 0..255", "bad_label")
        return np.ascontiguousarray(view, dtype=np.uint8), out_spacing
    volume = np.empty(view.shape, np.float32)
    np.copyto(volume, view, casting="unsafe")
    if slope != 1.0:
        volume *= np.float32(slope)
    if inter != 0.0:
        volume += np.float32(inter)
    return volume, out_spacing


def read_nifti(image_path: str, label_path: str | None):
    """``(volume float32, label uint8 or None, spacing)`` on the [D, H, W] axes."""
    import nibabel as nib

    def load(path):
        try:
            return nib.load(_local_copy(path))
        except Exception as exc:
            raise GeometryError(
                f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})", "unreadable"
            ) from None

    img = load(image_path)
    directions, spacing = _nifti_grid(img)
    volume, out_spacing = _nifti_array(img, image_path, directions, spacing, label=False)
    label = None
    if label_path is not None:
        lab = load(label_path)
        if lab.shape[:3] != img.shape[:3]:
            raise GeometryError(
                f"{label_path}: label shape {lab.shape} differs from image shape {img.shape}",
                "label_mismatch",
            )
        if not np.allclose(lab.affine, img.affine, atol=1e-3):
            raise GeometryError(f"{label_path}: label affine differs from {image_path}'s", "label_mismatch")
        label, _ = _nifti_array(lab, label_path, directions, spacing, label=True)
    return volume, label, out_spacing


def _local_copy(path: str) -> str:
    # nibabel reads local paths; remote inputs (gs://) are copied to a temporary file first.
    if "://" not in path:
        return path
    import tempfile

    suffix = ".nii.gz" if path.endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as out, FileSystems.open(path, CompressionTypes.UNCOMPRESSED) as f:
        shutil.copyfileobj(f, out, 8 << 20)
    return tmp


def shard_of(id_: str, shards: int) -> int:
    """The output shard of a volume: a stable hash of its id."""
    return int.from_bytes(hashlib.sha1(id_.encode()).digest()[:8], "big") % shards


class _Finish(beam.DoFn):
    """Reads a DICOM series or NIfTI pair and writes everything that depends on its voxels."""

    VOLUME_PARTS, BLOCK_PARTS = "volume_parts", "block_parts"

    def __init__(self, config: CtIngestConfig, kind: str):
        self._config = config
        self._kind = kind
        self._work = f"{config.output}/{WORK_DIR}"
        self._written = beam.metrics.Metrics.counter("ct", "volumes_written")
        self._rejected = beam.metrics.Metrics.counter("ct", "volumes_rejected")
        self._voxels = beam.metrics.Metrics.counter("ct", "voxels_written")
        self._blocks = beam.metrics.Metrics.counter("ct", "blocks_written")

    def process(self, element):
        key, members = element
        members = list(members)
        id_ = key
        if self._kind == "dicom":
            sources = [h.path for h in members]
        else:
            sources = [p for _, p in members]
        try:
            if self._kind == "dicom":
                volume, spacing = read_dicom_series(members)
                label = None
            else:
                image, label_path = _pair(key, members)
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


def _pair(stem: str, members: list) -> tuple[str, str | None]:
    """The image and (optional) label of a NIfTI stem; GeometryError when they do not pair up."""
    images = [p for role, p in members if role == "image"]
    labels = [p for role, p in members if role == "label"]
    sources = ", ".join(sorted(p for _, p in members))
    if not images:
        raise GeometryError(f"{stem}: a label without its image {stem}.nii[.gz]: {sources}", "unpaired_label")
    if len(images) > 1 or len(labels) > 1:
        raise GeometryError(f"{stem}: several NIfTI files share this name: {sources}", "duplicate_id")
    return images[0], (labels[0] if labels else None)


def _safe(id_: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in id_)


def write_preview(path: str, volume: np.ndarray, label: np.ndarray | None, spacing, title: str) -> None:
    """Middle axial, coronal and sagittal slices side by side (label in red), at true aspect ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, h, w = volume.shape
    sz, sy, sx = spacing
    views = [
        ("axial", volume[d // 2], None if label is None else label[d // 2], sy / sx, "upper"),
        ("coronal", volume[:, h // 2, :], None if label is None else label[:, h // 2, :], sz / sx, "lower"),
        ("sagittal", volume[:, :, w // 2], None if label is None else label[:, :, w // 2], sz / sy, "lower"),
    ]
    lo, hi = np.percentile(volume[:: max(1, d // 16)], [0.5, 99.5])
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.8))
    for ax, (name, img, lab, aspect, origin) in zip(axes, views):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin=origin, interpolation="nearest")
        if lab is not None and lab.any():
            ax.imshow(np.ma.masked_equal(lab, 0), cmap="autumn", alpha=0.45, aspect=aspect, origin=origin)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title}  {d}x{h}x{w}  spacing {sz:.2f}, {sy:.2f}, {sx:.2f} mm", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    with FileSystems.create(path) as f:
        f.write(buf.getvalue())


# -------------------------------------------------------------------------------------------------
# Shards, manifest, report
# -------------------------------------------------------------------------------------------------


def _concat(element, prefix: str, shards: int) -> str:
    """Concatenates a shard's part files (each whole TFRecord records) into its final file."""
    shard, parts = element
    path = f"{prefix}-{shard:05d}-of-{shards:05d}.tfrecord"
    with FileSystems.create(path) as out:
        for part in sorted(p for p in parts if p):
            with FileSystems.open(part, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                shutil.copyfileobj(f, out, 8 << 20)
    return path


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
    inspected = (
        pipeline
        | "ListFiles" >> beam.Create(files)
        | "Spread" >> beam.Reshuffle()
        | "Inspect"
        >> beam.ParDo(_Inspect(root)).with_outputs(_Inspect.DICOM, _Inspect.NIFTI, _Inspect.REJECTED)
    )
    dicom = (
        inspected[_Inspect.DICOM]
        | "BySeries" >> beam.GroupByKey()
        | "DicomVolumes"
        >> beam.ParDo(_Finish(config, "dicom")).with_outputs(
            _Finish.VOLUME_PARTS, _Finish.BLOCK_PARTS, main="lines"
        )
    )
    nifti = (
        inspected[_Inspect.NIFTI]
        | "ByStem" >> beam.GroupByKey()
        | "NiftiVolumes"
        >> beam.ParDo(_Finish(config, "nifti")).with_outputs(
            _Finish.VOLUME_PARTS, _Finish.BLOCK_PARTS, main="lines"
        )
    )
    for name in (_Finish.VOLUME_PARTS, _Finish.BLOCK_PARTS):
        prefix = f"{out}/{'volumes' if name == _Finish.VOLUME_PARTS else 'blocks'}"
        parts = (dicom[name], nifti[name]) | f"All[{name}]" >> beam.Flatten()
        if name == _Finish.BLOCK_PARTS:
            # Block files exist only when some volume was blocked: shards come from the parts alone.
            grouped = parts | f"ByShard[{name}]" >> beam.GroupByKey()
        else:
            # Every volume shard is written, empty or not, so the file set is always complete.
            empty = pipeline | f"AllShards[{name}]" >> beam.Create([(s, "") for s in range(config.shards)])
            grouped = (
                (parts, empty)
                | f"WithEmpty[{name}]" >> beam.Flatten()
                | f"ByShard[{name}]" >> beam.GroupByKey()
            )
        grouped | f"Concat[{name}]" >> beam.Map(_concat, prefix, config.shards)

    lines = (
        (inspected[_Inspect.REJECTED], dicom["lines"], nifti["lines"])
        | "AllLines" >> beam.Flatten()
        | "Collect" >> beam.combiners.ToList()
    )
    lines | "WriteManifest" >> beam.Map(_write_manifest, f"{out}/manifest.jsonl")
    report = lines | "Report" >> beam.Map(_report, files_digest(files), config)
    report | "WriteReport" >> WriteJson(f"{out}/report.json")
    return {"report": report, "lines": lines}


# -------------------------------------------------------------------------------------------------
# Readers
# -------------------------------------------------------------------------------------------------


def _parse(serialized, spec: FeatureSpec = VOLUME_SPEC):
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, spec.tf_features())


def _decode(ex):
    import tensorflow as tf

    shape = ex["shape"]
    volume = tf.reshape(tf.io.decode_raw(ex["volume"], tf.float32, little_endian=True), shape)
    has_label = tf.strings.length(ex["label"]) > 0
    label = tf.cond(
        has_label,
        lambda: tf.reshape(tf.io.decode_raw(ex["label"], tf.uint8), shape),
        lambda: tf.zeros(shape, tf.uint8),
    )
    return {**ex, "volume": volume, "label": label, "has_label": has_label}


def _files(out: str, prefix: str) -> list[str]:
    from headrace.transforms.tfrecord import list_shards

    return list_shards(f"{out.rstrip('/')}/{prefix}-*-of-*.tfrecord")


def volume_dataset(
    out: str,
    *,
    shuffle: bool = False,
    seed: int | None = None,
    labelled_only: bool = False,
    ids: Sequence[str] | None = None,
    repeat: bool = False,
):
    """Whole volumes of a ct-ingest output, one element each (shapes differ, so no batching):
    ``{"id", "volume" [D, H, W] float32, "label" [D, H, W] uint8 (zeros when absent), "has_label",
    "shape", "spacing"}``. `ids` keeps only those volumes (filtered before the voxels are decoded)."""
    import tensorflow as tf

    files = _files(out, "volumes")
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=2, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(_parse, num_parallel_calls=tf.data.AUTOTUNE)
    if ids is not None:
        wanted = tf.constant(sorted(ids) or [""], tf.string)
        ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(ex["id"], wanted)))
    if labelled_only:
        ds = ds.filter(lambda ex: tf.strings.length(ex["label"]) > 0)
    if shuffle:
        ds = ds.shuffle(16, seed=seed)
    if repeat:
        ds = ds.repeat()
    ds = ds.map(_decode, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(2)


def block_dataset(out: str):
    """The blocks of the large volumes: like `volume_dataset`, plus index, start, core_start/stop."""
    import tensorflow as tf

    ds = tf.data.TFRecordDataset(_files(out, "blocks"))
    return ds.map(lambda s: _decode(_parse(s, BLOCK_SPEC)), num_parallel_calls=tf.data.AUTOTUNE)


def _crop(volume, label, centre, patch, pad_value):
    import tensorflow as tf

    patch_t = tf.constant(patch, tf.int64)
    shape = tf.shape(volume, out_type=tf.int64)
    # Pad volumes smaller than the patch (at the end of each axis), then clamp the window inside.
    pad = tf.maximum(patch_t - shape, 0)
    paddings = tf.stack([tf.zeros_like(pad), pad], axis=1)
    volume = tf.pad(volume, paddings, constant_values=pad_value)
    label = tf.pad(label, paddings)
    start = tf.clip_by_value(centre - patch_t // 2, 0, tf.maximum(shape + pad - patch_t, 0))
    return tf.slice(volume, start, patch_t), tf.slice(label, start, patch_t), start


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
    """Random [pd, ph, pw] patches of the volumes: ``{"volume", "label", "id", "start", "foreground"}``.

    For a labelled volume, a patch is centred on a random foreground voxel with probability
    `foreground_fraction` and on a background voxel otherwise (the first background voxel among 16
    uniform draws), so that small structures are seen as often as asked. Unlabelled volumes give
    uniform patches. Patches of volumes smaller than `patch` are padded with the volume's minimum.
    Deterministic for a given `seed` (stateless random ops keyed by volume and patch number).
    """
    import tensorflow as tf

    patch = tuple(int(p) for p in patch)
    volumes = volume_dataset(
        out, shuffle=shuffle, seed=seed, labelled_only=labelled_only, ids=ids, repeat=repeat
    ).enumerate()

    def per_volume(i, v):
        foreground = tf.where(v["label"] > 0)  # [N, 3]; empty without a label
        shape = tf.shape(v["volume"], out_type=tf.int64)
        minimum = tf.reduce_min(v["volume"])

        def one(j):
            s = tf.stack([tf.cast(seed, tf.int64), i * 100_003 + j])
            coin = tf.random.stateless_uniform([], seed=s)
            want_fg = tf.logical_and(coin < foreground_fraction, tf.shape(foreground)[0] > 0)

            def fg():
                k = tf.random.stateless_uniform(
                    [], seed=s + 1, maxval=tf.shape(foreground, out_type=tf.int64)[0], dtype=tf.int64
                )
                return foreground[k]

            def bg():
                draws = tf.random.stateless_uniform([16, 3], seed=s + 2, minval=0.0, maxval=1.0)
                cand = tf.cast(draws * tf.cast(shape, tf.float32), tf.int64)
                cand = tf.minimum(cand, shape - 1)
                is_bg = tf.gather_nd(v["label"], cand) == 0
                first = tf.argmax(tf.cast(is_bg, tf.int32))
                return cand[first]

            centre = tf.cond(want_fg, fg, bg)
            vol, lab, start = _crop(v["volume"], v["label"], centre, patch, minimum)
            return {
                "volume": tf.ensure_shape(vol, patch),
                "label": tf.ensure_shape(lab, patch),
                "id": v["id"],
                "start": start,
                "foreground": want_fg,
            }

        return tf.data.Dataset.range(patches_per_volume).map(one)

    ds = volumes.flat_map(per_volume)
    if shuffle:
        ds = ds.shuffle(4 * patches_per_volume, seed=seed)
    return ds
