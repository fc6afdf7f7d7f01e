"""Decoding image files whole, with the reason when one cannot be (image-ingest's records, the omni
path's pictures).

`decode_image` turns any file Pillow decodes into upright RGB JPEG bytes: a JPEG that is already RGB,
upright and within `max_side` keeps its bytes; any other image is turned upright by its EXIF orientation,
converted to RGB (alpha laid over white, 16-bit grey scaled to 8 bits), shrunk and re-encoded. Zero-byte,
truncated, corrupt and non-image files and decompression bombs raise `ValueError` saying which.
"""

from __future__ import annotations

import io
import warnings

__all__ = ["decode_image"]


def decode_image(data: bytes, *, max_side: int, quality: int) -> tuple[bytes, int, int, bool]:
    """(JPEG bytes, height, width, re-encoded?) of an image file's bytes; `ValueError` with the reason
    when it is not an image Pillow decodes whole."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ValueError("empty file")
    image = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # the whole image: a truncated file fails here, not in a trainer
    except UnidentifiedImageError:
        kind = _magic(data)
        if kind:  # the signature of an image format whose header Pillow cannot parse
            raise ValueError(f"corrupt or truncated {kind} image: its header does not parse") from None
        raise ValueError("not an image (Pillow identifies no format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's truncated / corrupt errors
        kind = f"{image.format} image" if image is not None and image.format else "image"
        raise ValueError(f"corrupt or truncated {kind}: {exc}") from None
    fmt = image.format or "image"
    orientation = image.getexif().get(0x0112, 1)
    height, width = image.height, image.width
    if fmt == "JPEG" and image.mode == "RGB" and orientation in (0, 1) and max(height, width) <= max_side:
        return data, height, width, False
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grey: scale to 8 bits
        image = image.point(lambda v: v / 256).convert("L")
    image = image.convert("RGB")
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue(), image.height, image.width, True


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _magic(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)
