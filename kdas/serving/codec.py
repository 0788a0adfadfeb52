"""The served model's wire format, with no MLflow in it: base64 PNG/JPEG images in (checked
from their headers before any pixel is decoded), base64 PNG masks out."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
from PIL import Image


class BadImage(ValueError):
    """A request row that is not an acceptable image; the message names the row."""


def image_bytes(value: Any, row: int) -> bytes:
    if not isinstance(value, str):
        raise BadImage(f"row {row}: 'image' must be a base64-encoded PNG or JPEG string, got {type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") else value  # tolerate data: URIs
    text = "".join(text.split())  # and line-wrapped base64
    if not text:
        raise BadImage(f"row {row}: 'image' is empty")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(f"row {row}: 'image' is not valid base64") from None


def check_header(data: bytes, row: int, max_side: int, max_pixels: int) -> int:
    """Format and size from the header alone, before any pixel is decoded (a small file
    can claim a huge image); returns the image's pixel count."""
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as im:
            width, height = im.size
    except Image.DecompressionBombError:
        raise BadImage(f"row {row}: image too large (at most {max_side} px a side, {max_pixels} pixels)") from None
    except Exception as exc:  # PIL raises several unrelated types for bad data
        raise BadImage(f"row {row}: not a decodable PNG or JPEG image ({type(exc).__name__})") from None
    if width > max_side or height > max_side or width * height > max_pixels:
        raise BadImage(
            f"row {row}: image too large: {width}x{height} px (at most {max_side} px a side, {max_pixels} pixels)"
        )
    return width * height


def decode(data: bytes, row: int) -> np.ndarray:
    from kdas.io import ImageReadError, read_rgb  # the training data's decoding path

    try:
        return read_rgb(io.BytesIO(data))  # type: ignore[arg-type]  # PIL reads file objects
    except ImageReadError as exc:
        cause = exc.__cause__ or exc
        raise BadImage(f"row {row}: not a decodable PNG or JPEG image ({cause})") from None


def png_base64(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")  # 2-D uint8: mode L
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_image(image: np.ndarray, fmt: str = "PNG") -> str:
    """An HxWx3 (or HxW) uint8 array as the base64 string the served model takes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_mask(text: str) -> np.ndarray:
    """A served mask (base64 PNG) back to an HxW bool array."""
    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        return np.asarray(im.convert("L")) > 127
