"""Preview images of volumes: middle axial, coronal and sagittal slices, the label in red, as a PNG."""

from __future__ import annotations

import io

import numpy as np
from apache_beam.io.filesystems import FileSystems

__all__ = ["write_preview"]


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
