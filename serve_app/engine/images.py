"""Output encoding: the reference saves JPEG at quality 95; PNG and WebP are our extensions."""

from __future__ import annotations

import io

from PIL import Image

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
JPEG_QUALITY = 95


def encode_image(image: Image.Image, fmt: str) -> bytes:
    """Encode a PIL image as `jpeg` (quality 95, like the reference), `png` or `webp` (lossless)."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", lossless=True)
    elif fmt == "png":
        image.save(buffer, format="PNG")
    else:
        raise ValueError(f"unknown output format {fmt!r}; expected one of {sorted(_PIL_FORMATS)}")
    return buffer.getvalue()
