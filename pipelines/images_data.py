"""Image sets built from pictures installed packages ship (nothing is downloaded), as class folders that
``headrace run image-ingest`` reads.

* `write_digits`: scikit-learn's 1,797 labelled 8x8 handwritten digits (UCI), one PNG each in
  ``ROOT/<digit>/``: a real ten-class task.
* `write_photos`: the photographs inside scikit-image, scikit-learn and matplotlib, each a class, cut
  into crops at random places, scales and angles, flipped and colour-jittered, saved as JPEG or PNG at
  random sizes: real photographic content and real JPEG decoding for the input pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["PHOTOS", "photo", "write_digits", "write_photos"]

# Class name -> (package, file below its data folder).
PHOTOS = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "cat": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "camera": ("skimage", "data/camera.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}


def photo(name: str):
    """The installed photograph of class `name` as a Pillow RGB image."""
    import importlib

    from PIL import Image

    package, rel = PHOTOS[name]
    path = Path(os.path.dirname(importlib.import_module(package).__file__)) / rel
    return Image.open(path).convert("RGB")


def write_digits(root: str | os.PathLike) -> int:
    """scikit-learn's digits as ``ROOT/<digit>/<index>.png`` (8x8 grey, 0..16 scaled to 0..255)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.round(image * (255 / 16)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return len(digits.target)


def write_photos(root: str | os.PathLike, per_class: int = 40, *, seed: int = 0, max_side: int = 320) -> int:
    """`per_class` augmented crops of each photograph in `PHOTOS` under ``ROOT/<class>/``; returns the
    number of files written. A crop covers 30-90% of the photo's shorter side, is rotated by up to
    25 degrees, flipped half the time, jittered in brightness and saturation, resized so that its
    longer side is 96..max_side, and saved as JPEG (quality 70..95) or, one in five, PNG."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    root = Path(root)
    written = 0
    for name in sorted(PHOTOS):
        source = photo(name)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        w, h = source.size
        for i in range(per_class):
            side = int(min(w, h) * rng.uniform(0.3, 0.9))
            aspect = rng.uniform(0.75, 1.33)
            cw, ch = min(w, int(side * aspect)), min(h, side)
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = source.crop((x, y, x + cw, y + ch)).rotate(rng.uniform(-25, 25), resample=Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.7, 1.3))
            crop = ImageEnhance.Color(crop).enhance(rng.uniform(0.6, 1.4))
            longer = int(rng.integers(96, max_side + 1))
            scale = longer / max(crop.size)
            crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))))
            if rng.random() < 0.2:
                crop.save(folder / f"{i:03d}.png")
            else:
                crop.save(folder / f"{i:03d}.jpg", quality=int(rng.integers(70, 96)))
            written += 1
    return written
