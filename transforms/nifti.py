"""NIfTI files -> float32 volumes (and uint8 label maps) on headrace's [D, H, W] axes, with their spacing.

Read with nibabel (scaling applied, in one pass from the stored array), 4D volumes with a single time
point squeezed, others rejected. ``NAME_label.nii[.gz]`` is the segmentation of ``NAME.nii[.gz]``
(`nifti_stem`, `pair`): same grid (shape and affine), integer values 0..255. A volume with a NaN or
infinite voxel, a voxel size that is not positive, or a singular affine is rejected, never written. Axes follow
`headrace.transforms.volume`'s convention, as for DICOM (RAS+ world to LPS).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from headrace.transforms.volume import GeometryError, reorient

__all__ = ["grid_corners", "nifti_stem", "pair", "read_label_on", "read_nifti"]


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


def _raw_pixdim(path: str) -> np.ndarray:
    """The voxel sizes as the file states them: nibabel's loader replaces zero by 1 and negative by its
    absolute value (with a log line), which would let a broken header pass as valid."""
    import gzip

    import nibabel as nib

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        stream = gzip.GzipFile(fileobj=f) if path.endswith(".gz") else f
        header = nib.Nifti1Header.from_fileobj(stream, check=False)
    return np.asarray(header["pixdim"][1:4], dtype=np.float64)


def _check_grid(img, path: str) -> None:
    """GeometryError unless the affine maps the three array axes to three independent directions."""
    affine = np.asarray(img.affine, dtype=np.float64)
    axes = affine[:3, :3]
    if not np.isfinite(affine).all() or abs(np.linalg.det(axes)) < 1e-9 * max(1.0, np.abs(axes).max() ** 3):
        raise GeometryError(f"{path}: the affine {axes.tolist()} is singular or not finite", "bad_spacing")


def _load(path: str):
    """The nibabel image of `path`, its stated voxel sizes checked first (before nibabel replaces zero
    and negative ones); GeometryError when it is not a readable NIfTI file."""
    import nibabel as nib

    try:
        raw = _raw_pixdim(path)
    except Exception as exc:
        raise GeometryError(
            f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})", "unreadable"
        ) from None
    if not (np.isfinite(raw).all() and (raw > 0).all()):
        raise GeometryError(
            f"{path}: voxel size (pixdim) {raw.tolist()} must be positive and finite", "bad_spacing"
        )
    try:
        img = nib.load(_local_copy(path))
    except Exception as exc:
        raise GeometryError(
            f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})", "unreadable"
        ) from None
    _check_grid(img, path)
    return img


def read_nifti(image_path: str, label_path: str | None):
    """``(volume float32, label uint8 or None, spacing)`` on the [D, H, W] axes."""
    img = _load(image_path)
    directions, spacing = _nifti_grid(img)
    volume, out_spacing = _nifti_array(img, image_path, directions, spacing, label=False)
    finite = np.isfinite(volume)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise GeometryError(
            f"{image_path}: {len(bad)} voxel(s) are NaN or infinite (the first at [D, H, W] "
            f"{bad[0].tolist()}); a volume must hold finite values",
            "bad_voxels",
        )
    label = None
    if label_path is not None:
        lab = _load(label_path)
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


def grid_corners(origin, axes, shape) -> np.ndarray:
    """The 8 corner voxel centres (LPS mm, rows sorted) of a grid: voxel ``i`` of axis ``a`` sits at
    ``origin + sum_a i_a * axes[a]``. Equal corner sets mean the same grid, whatever the axis order."""
    origin, axes = np.asarray(origin, np.float64), np.asarray(axes, np.float64)
    corners = [
        origin + sum(c * (n - 1) * axes[a] for a, (c, n) in enumerate(zip(pick, shape)))
        for pick in np.ndindex(2, 2, 2)
    ]
    return np.array(sorted(np.round(corners, 2).tolist()))


def read_label_on(label_path: str, shape, corners: np.ndarray, tolerance_mm: float) -> np.ndarray:
    """A NIfTI label map on a volume's [D, H, W] grid (`shape`, `corners` from `grid_corners` in LPS);
    GeometryError when the label's grid is another one (shape, or corners off by more than
    `tolerance_mm`)."""
    lab = _load(label_path)
    directions, spacing = _nifti_grid(lab)
    label, _ = _nifti_array(lab, label_path, directions, spacing, label=True)
    lps_axes = (_RAS_TO_LPS @ lab.affine[:3, :3]).T
    theirs = grid_corners(_RAS_TO_LPS @ lab.affine[:3, 3], lps_axes, lab.shape[:3])
    if tuple(label.shape) != tuple(shape):
        raise GeometryError(
            f"{label_path}: label grid {tuple(label.shape)} differs from the volume's {tuple(shape)}",
            "label_mismatch",
        )
    off = float(np.abs(theirs - corners).max())
    if off > tolerance_mm:
        raise GeometryError(
            f"{label_path}: label grid is {off:.2f} mm away from the volume's (corners differ)",
            "label_mismatch",
        )
    return label
