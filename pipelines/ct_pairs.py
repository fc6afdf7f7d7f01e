"""``ct-ingest --labels``: label maps paired with their images by a CSV, not by ``NAME_label`` naming.

`read_label_pairs` checks the CSV when the pipeline is built; `LabelPairs` tells the inspect step which
files are labels (of a NIfTI image, or of the DICOM series in a folder); `unused_labels` adds a rejected
manifest line for a label whose folder gave no series, so every input file is still accounted for once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from headrace.core.errors import InputError
from headrace.transforms.columnar import CsvBatch, iter_csv_batches
from headrace.transforms.nifti import nifti_stem

__all__ = ["LabelPairs", "file_id", "manifest_line", "read_label_pairs", "unused_labels"]


def manifest_line(id_: str, sources: Sequence[str], status: str, reason: str = "", **extra) -> dict:
    """One line of ct-ingest's manifest.jsonl (``shape`` and ``spacing`` always present)."""
    return {
        "id": id_,
        "sources": sorted(sources),
        "status": status,
        "reason": reason,
        "shape": extra.pop("shape", None),
        "spacing": extra.pop("spacing", None),
        **extra,
    }


def file_id(path: str, root: str) -> str:
    return os.path.relpath(path, root) if not path.startswith(("gs://", "s3://")) else path


@dataclasses.dataclass(frozen=True)
class LabelPairs:
    """The pairs of ``--labels``: label path -> NIfTI image stem, series folder -> label path."""

    nifti_images: dict[str, str] = dataclasses.field(default_factory=dict)  # label -> image's stem
    dicom_labels: dict[str, str] = dataclasses.field(default_factory=dict)  # folder -> label

    @property
    def dicom_label_files(self) -> set[str]:
        return set(self.dicom_labels.values())


def read_label_pairs(path: str | None, root: str, files: Sequence[str]) -> LabelPairs:
    """``--labels`` checked when the pipeline is built: every image and label exists under --input."""
    if not path:
        return LabelPairs()
    inputs = set(files)
    pairs = LabelPairs()
    for item in iter_csv_batches(path, ["image", "label"]):
        if not isinstance(item, CsvBatch):
            raise InputError(f"--labels {path}:{item.line}: {item.reason}")
        for line, image, label in zip(
            item.lines, item.table.column("image").to_pylist(), item.table.column("label").to_pylist()
        ):
            image_path, label_path = f"{root}/{image.strip('/')}", f"{root}/{label.strip('/')}"
            if label_path not in inputs or nifti_stem(label_path) is None:
                raise InputError(f"--labels {path}:{line}: label {label!r} is not a NIfTI file under {root}")
            if label_path in pairs.nifti_images or label_path in pairs.dicom_label_files:
                raise InputError(f"--labels {path}:{line}: label {label!r} is paired twice")
            if image_path in inputs and nifti_stem(image_path) is not None:
                pairs.nifti_images[label_path] = nifti_stem(image_path.rsplit("/", 1)[-1])
            elif any(f.startswith(image_path + "/") for f in inputs):
                pairs.dicom_labels[image_path] = label_path
            else:
                raise InputError(
                    f"--labels {path}:{line}: image {image!r} is neither a NIfTI file nor a folder under {root}"
                )
    return pairs


def unused_labels(lines: list[dict], pairs: LabelPairs, root: str) -> list[dict]:
    """`lines` plus a rejected line for each ``--labels`` label of a folder that gave no DICOM series."""
    used = {s for line in lines for s in line["sources"]}
    extra = [
        manifest_line(
            file_id(label, root),
            [label],
            "rejected",
            f"{label}: --labels pairs it with {folder}, which holds no DICOM series",
            kind="unpaired_label",
        )
        for folder, label in sorted(pairs.dicom_labels.items())
        if label not in used
    ]
    return lines + extra
