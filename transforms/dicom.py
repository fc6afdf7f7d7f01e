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
import hashlib
from collections.abc import Sequence

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from headrace.transforms.volume import GeometryError, acquisition_view, canonical_axes, canonical_shape

__all__ = ["SliceHeader", "dicom_geometry", "read_dicom_series", "read_header", "series_corners"]


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
    "Rows": "(0028,0010)",
    "Columns": "(0028,0011)",
    "PixelSpacing": "(0028,0030)",
    "ImagePositionPatient": "(0020,0032)",
    "ImageOrientationPatient": "(0020,0037)",
}
_TAGS = {
    **_REQUIRED,
    "SeriesInstanceUID": "(0020,000E)",
    "FrameOfReferenceUID": "(0020,0052)",
    "RescaleSlope": "(0028,1053)",
    "RescaleIntercept": "(0028,1052)",
    "SliceThickness": "(0018,0050)",
    "BitsAllocated": "(0028,0100)",
    "BitsStored": "(0028,0101)",
    "PixelRepresentation": "(0028,0103)",
    "SamplesPerPixel": "(0028,0002)",
    "NumberOfFrames": "(0028,0008)",
}


def _attribute(ds, keyword: str, count: int | None, *, required: bool = True, default=None):
    """The values of `keyword` as finite floats (`count` of them; None: one, returned bare); a
    GeometryError naming the attribute and its tag when it is missing, unparsable or the wrong length."""
    tag = _TAGS[keyword]
    try:  # pydicom converts the value when it is read: "abc" as a decimal string raises there
        raw = ds.get(keyword)
    except Exception as exc:
        raise GeometryError(f"{keyword} {tag} is not parsable ({exc})", "bad_attribute") from None
    from pydicom.multival import MultiValue

    many = isinstance(raw, (list, tuple, MultiValue))
    if raw is None or raw == "" or (many and len(raw) == 0):
        if required:
            raise GeometryError(f"missing {keyword} {tag}", "missing_attribute")
        return default
    values = list(raw) if many else [raw]
    want = 1 if count is None else count
    if len(values) != want:
        raise GeometryError(
            f"{keyword} {tag} has {len(values)} value(s) {_shown(values)}, expected {want}", "bad_attribute"
        )
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise GeometryError(f"{keyword} {tag} is not numeric: {_shown(values)}", "bad_attribute") from None
    if not all(np.isfinite(numbers)):
        raise GeometryError(f"{keyword} {tag} is not finite: {_shown(values)}", "bad_attribute")
    return numbers[0] if count is None else tuple(numbers)


def _shown(values) -> str:
    text = "\\".join(str(v) for v in values)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _dataset(path: str, *, pixels: bool):
    """The dataset of one file. A file without the 128-byte preamble and file meta (older scanners) is
    read when the dataset itself parses; anything else that is not DICOM is a GeometryError."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    def read(force: bool):
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return pydicom.dcmread(f, stop_before_pixels=not pixels, force=force)

    try:
        return read(False)
    except InvalidDicomError as exc:
        why = exc
    except Exception as exc:  # truncated or garbled files raise anything from struct to KeyError
        raise GeometryError(f"unreadable DICOM file ({type(exc).__name__}: {exc})", "unreadable") from None
    try:  # no preamble: accept it only when it parses as a dataset with an image's attributes
        ds = read(True)
    except Exception:
        ds = None
    if ds is None or "Rows" not in ds or "ImagePositionPatient" not in ds:
        raise GeometryError(f"not a DICOM file ({why})", "not_dicom") from None
    if "TransferSyntaxUID" not in ds.file_meta:  # pydicom guessed the encoding from the data
        ds.file_meta.TransferSyntaxUID = (
            "1.2.840.10008.1.2.1" if not ds.is_implicit_VR else "1.2.840.10008.1.2"
        )
    return ds


def read_header(path: str) -> tuple[str, SliceHeader]:
    """(series key, geometry) of a DICOM file, read without its pixels; GeometryError naming the
    attribute when the file is not DICOM or a geometry attribute is missing or malformed.

    The series key is the SeriesInstanceUID. Anonymisation sometimes blanks it: such slices are grouped
    by what makes them one grid instead (FrameOfReferenceUID, orientation, size and pixel spacing), under
    a key that says so."""
    ds = _dataset(path, pixels=False)
    frames = _attribute(ds, "NumberOfFrames", None, required=False, default=1.0)
    if frames != int(frames) or frames < 1:
        raise GeometryError(f"NumberOfFrames {_TAGS['NumberOfFrames']} is {frames}", "bad_attribute")
    if frames > 1:
        raise GeometryError(
            f"multi-frame DICOM (NumberOfFrames={int(frames)}) is not supported", "multi_frame"
        )
    rows, columns = _attribute(ds, "Rows", None), _attribute(ds, "Columns", None)
    for keyword, value in (("Rows", rows), ("Columns", columns)):
        if value != int(value) or not 1 <= value <= 65535:
            raise GeometryError(f"{keyword} {_TAGS[keyword]} is {value}, expected 1..65535", "bad_attribute")
    allocated = _attribute(ds, "BitsAllocated", None, required=False, default=16.0)
    samples = _attribute(ds, "SamplesPerPixel", None, required=False, default=1.0)
    for keyword, value, allowed in (
        ("BitsAllocated", allocated, (8, 16, 32)),
        ("SamplesPerPixel", samples, (1,)),
    ):
        if value not in allowed:
            raise GeometryError(
                f"{keyword} {_TAGS[keyword]} is {value:g}, expected {' or '.join(map(str, allowed))}",
                "bad_attribute",
            )
    stored = _attribute(ds, "BitsStored", None, required=False, default=allocated)
    if not 1 <= stored <= allocated:
        raise GeometryError(
            f"BitsStored {_TAGS['BitsStored']} is {stored:g} with BitsAllocated {allocated:g}",
            "bad_attribute",
        )
    if _attribute(ds, "PixelRepresentation", None, required=False, default=0.0) not in (0.0, 1.0):
        raise GeometryError(
            f"PixelRepresentation {_TAGS['PixelRepresentation']} must be 0 or 1", "bad_attribute"
        )
    position = _attribute(ds, "ImagePositionPatient", 3)
    orientation = _attribute(ds, "ImageOrientationPatient", 6)
    pixel_spacing = _attribute(ds, "PixelSpacing", 2)
    if min(pixel_spacing) <= 0:
        raise GeometryError(
            f"PixelSpacing {_TAGS['PixelSpacing']} {pixel_spacing} must be > 0", "bad_attribute"
        )
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(row_dir @ col_dir) > 1e-3
    ):
        raise GeometryError(
            f"ImageOrientationPatient {_TAGS['ImageOrientationPatient']} {list(orientation)} is not two "
            "orthogonal unit vectors",
            "bad_attribute",
        )
    slope = _attribute(ds, "RescaleSlope", None, required=False, default=1.0)
    intercept = _attribute(ds, "RescaleIntercept", None, required=False, default=0.0)
    if slope == 0:
        raise GeometryError(f"RescaleSlope {_TAGS['RescaleSlope']} is 0", "bad_attribute")
    thickness = _attribute(ds, "SliceThickness", None, required=False)
    header = SliceHeader(
        path=path,
        position=position,  # type: ignore[arg-type]
        orientation=orientation,  # type: ignore[arg-type]
        pixel_spacing=pixel_spacing,  # type: ignore[arg-type]
        rows=int(rows),
        columns=int(columns),
        slope=slope,
        intercept=intercept,
        thickness=thickness,
    )
    uid = str(ds.get("SeriesInstanceUID") or "").strip()
    if uid:
        return uid, header
    frame = str(ds.get("FrameOfReferenceUID") or "").strip()
    if not frame:
        raise GeometryError(
            f"SeriesInstanceUID {_TAGS['SeriesInstanceUID']} and FrameOfReferenceUID "
            f"{_TAGS['FrameOfReferenceUID']} are both empty: the slice cannot be put in a series",
            "missing_attribute",
        )
    grid = ",".join(f"{v:.4f}" for v in (*orientation, *pixel_spacing))
    digest = hashlib.sha1(f"{grid}/{int(rows)}x{int(columns)}".encode()).hexdigest()[:8]
    return f"frame-{frame}-{digest}", header


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
    ordered, dz, directions = dicom_geometry(headers)
    rows, cols = ordered[0].rows, ordered[0].columns
    acquired = (len(ordered), rows, cols)
    # Allocated once in the final [D, H, W] layout; slices are written through a view in acquisition order.
    volume = np.empty(canonical_shape(acquired, directions), np.float32)
    slices = acquisition_view(volume, directions)
    for k, h in enumerate(ordered):
        try:
            ds = _dataset(h.path, pixels=True)
        except GeometryError as exc:
            raise GeometryError(f"{h.path}: {exc}", exc.kind) from None
        try:
            pixels = ds.pixel_array
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


def series_corners(headers: Sequence[SliceHeader]) -> np.ndarray:
    """The 8 corner voxel centres (LPS mm) of a series' grid, as `grid_corners` gives them."""
    from headrace.transforms.nifti import grid_corners

    ordered, dz, directions = dicom_geometry(headers)
    first = ordered[0]
    row_dir, col_dir = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    normal = directions[0] / np.linalg.norm(directions[0])
    axes = [normal * dz, col_dir * first.pixel_spacing[0], row_dir * first.pixel_spacing[1]]
    return grid_corners(first.position, axes, (len(ordered), first.rows, first.columns))
