"""DICOM series -> float32 volumes in HU on headrace's [D, H, W] axes, with their spacing.

`read_header` reads one file's geometry without its pixels (a file that is not DICOM, or lacks a geometry
attribute, is a `GeometryError` naming the attribute); `dicom_geometry` checks that a series' slices form
one regular grid and orders them; `read_dicom_series` reads the pixels into the final layout.

Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of the two
ImageOrientationPatient vectors), ascending; stored values become HU as ``value * RescaleSlope +
RescaleIntercept`` (float64, then float32); spacing is (distance between slice positions, PixelSpacing).
A series is rejected, with the files named, when slices differ in size, orientation or pixel spacing,
when two slices share a position, when the distance between slices varies by more than 1% (or 0.01 mm),
or when a slice's pixel data cannot be decoded. Multi-frame files are rejected (not supported).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from headrace.transforms.volume import GeometryError, acquisition_view, canonical_axes, canonical_shape

__all__ = ["SliceHeader", "dicom_geometry", "read_dicom_series", "read_header"]


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


def read_header(path: str) -> tuple[str, SliceHeader]:
    """(SeriesInstanceUID, geometry) of a DICOM file, read without its pixels; GeometryError naming the
    attribute when the file is not DICOM or its geometry is unusable."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise GeometryError(f"not a DICOM file ({exc})", "not_dicom") from None
    except Exception as exc:  # truncated or garbled files raise anything from struct to KeyError
        raise GeometryError(f"unreadable DICOM file ({type(exc).__name__}: {exc})", "unreadable") from None
    for keyword, tag in _REQUIRED.items():
        if keyword not in ds or ds[keyword].value in (None, ""):
            raise GeometryError(f"missing {keyword} {tag}", "missing_attribute")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise GeometryError(f"multi-frame DICOM (NumberOfFrames={frames}) is not supported", "multi_frame")
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
