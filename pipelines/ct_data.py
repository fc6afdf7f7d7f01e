"""Generated CT studies, written as real DICOM series (pydicom) and NIfTI files (nibabel).

For tests, benchmarks and the demo: a phantom (a water-filled body ellipse with a bone ring, air
outside, and a spherical "lesion" whose mask is the label) written exactly as a scanner would store it:
int16 stored values with RescaleSlope / RescaleIntercept, one file per slice, positions along the slice
normal, files named at random and in any order. `expected_hu` gives the array the ingest must produce.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["Phantom", "expected_hu", "phantom", "stored_values", "write_dicom_series", "write_nifti"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclasses.dataclass(frozen=True)
class Phantom:
    hu: np.ndarray  # float32 [D, H, W]
    label: np.ndarray  # uint8 [D, H, W], 1 inside the lesion


def phantom(shape: Sequence[int], *, seed: int = 0, lesion_radius: float = 0.15) -> Phantom:
    """A body phantom in HU on a [D, H, W] grid (integer HU values, plus noise of +-20 HU)."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij", sparse=True
    )
    body = (y / 0.7) ** 2 + (x / 0.9) ** 2
    hu = np.full(shape, -1000.0, np.float32)
    hu[np.broadcast_to(body <= 1.0, shape)] = 40.0  # soft tissue
    ring = (body > 0.8) & (body <= 1.0)
    hu[np.broadcast_to(ring, shape)] = 700.0  # bone
    centre = rng.uniform(-0.3, 0.3, 3)
    lesion = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= lesion_radius**2
    hu[lesion] = 120.0
    hu += rng.integers(-20, 21, size=shape).astype(np.float32)
    return Phantom(hu=hu, label=lesion.astype(np.uint8))


def _uid(rng: np.random.Generator) -> str:
    return "2.25." + str(int.from_bytes(rng.bytes(15), "big"))


def write_dicom_series(
    out_dir: str | os.PathLike,
    hu: np.ndarray,
    *,
    spacing: Sequence[float] = (2.5, 0.75, 0.75),
    slope: float = 1.0,
    intercept: float = -1024.0,
    origin: Sequence[float] = (-120.0, -110.0, 35.0),
    series_uid: str | None = None,
    seed: int = 0,
    shuffle_names: bool = True,
    positions: Sequence[float] | None = None,
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
) -> tuple[str, list[str]]:
    """Writes `hu` ([slices, rows, columns]) as a CT series, one file per slice; returns (SeriesInstanceUID,
    files).

    Stored values are ``round((hu - intercept) / slope)`` as int16, so `expected_hu` of the stored
    values is what an ingest must produce. Slice k sits at ``origin + t_k * normal`` with the normal the
    cross product of the two `orientation` (ImageOrientationPatient) vectors and ``t_k = k * spacing[0]``
    (or `positions[k]`). The default orientation is axial, where the array already is [D, H, W]; files get
    random names and are written in random order when `shuffle_names`.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or _uid(rng)
    study_uid = _uid(rng)
    stored = stored_values(hu, slope, intercept)
    d, h, w = hu.shape
    sz, sy, sx = spacing
    ts = list(positions) if positions is not None else [k * sz for k in range(d)]
    normal = np.cross(orientation[:3], orientation[3:])
    order = rng.permutation(d) if shuffle_names else np.arange(d)
    files = []
    for k in order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = _uid(rng)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.PatientID = "PHANTOM"
        ds.InstanceNumber = int(k) + 1
        ds.ImagePositionPatient = [round(float(o + ts[k] * n), 4) for o, n in zip(origin, normal)]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(sy), float(sx)]
        ds.SliceThickness = float(sz)
        ds.Rows, ds.Columns = h, w
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.PixelData = stored[k].astype("<i2").tobytes()
        name = rng.bytes(6).hex() if shuffle_names else f"slice{k:04d}"
        path = out / f"{name}.dcm" if not shuffle_names else out / name
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        files.append(str(path))
    return series_uid, files


def stored_values(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """The int16 values a scanner stores for `hu` under slope and intercept."""
    return np.clip(np.rint((hu.astype(np.float64) - intercept) / slope), -32768, 32767).astype(np.int16)


def expected_hu(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """What the ingest must produce from `write_dicom_series(hu, slope, intercept)`: float32 HU."""
    return (stored_values(hu, slope, intercept).astype(np.float64) * slope + intercept).astype(np.float32)


def write_nifti(
    path: str | os.PathLike,
    volume: np.ndarray,
    *,
    spacing: Sequence[float] = (2.5, 0.75, 0.75),
    dtype=np.int16,
) -> str:
    """Writes a [D, H, W] volume (headrace's axes, spacing z, y, x) as NIfTI with a RAS+ affine.

    The inverse of the ingest's orientation: stored as [x(R), y(A), z(S)] with an affine of positive
    zooms, i.e. W and H are reversed (headrace's W runs to the left, H to the posterior).
    """
    import nibabel as nib

    sz, sy, sx = spacing
    data = np.ascontiguousarray(volume[:, ::-1, ::-1].transpose(2, 1, 0)).astype(dtype)
    affine = np.diag([sx, sy, sz, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return str(path)
