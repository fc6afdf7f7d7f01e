"""NIfTI files -> float32 volumes (and uint8 label maps) on headrace's [D, H, W] axes, with their spacing.

Read with nibabel (scaling applied, in one pass from the stored array), 4D volumes with a single time
point squeezed, others rejected. ``NAME_label.nii[.gz]`` is the segmentation of ``NAME.nii[.gz]``
(`nifti_stem`, `pair`): same grid (shape and affine), integer values 0..255. Axes follow
`headrace.transforms.volume`'s convention, as for DICOM (RAS+ world to LPS).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from headrace.transforms.volume import GeometryError, reorient

__all__ = ["nifti_stem", "pair", "read_nifti"]


def nifti_stem(name: str) -> str | None:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def pair(stem: str, members: list) -> tuple[str, str | None]:
    """The image and (optional) label of a NIfTI stem; GeometryError when they do not pair up."""
    images = [p for role, p in members if role == "image"]
    labels = [p for role, p in members if role == "label"]
    sources = ", ".join(sorted(p for _, p in members))
    if not images:
        raise GeometryError(f"{stem}: a label without its image {stem}.nii[.gz]: {sources}", "unpaired_label")
    if len(images) > 1 or len(labels) > 1:
        raise GeometryError(f"{stem}: several NIfTI files share this name: {sources}", "duplicate_id")
    return images[0], (labels[0] if labels else None)


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
