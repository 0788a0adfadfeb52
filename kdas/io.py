"""Small file helpers shared by every stage: atomic writes and image decoding.

A failed run must never leave a half-written dataset, checkpoint or report behind, so
every writer goes through `atomic_path` / `atomic_dir`: write to a temporary sibling,
then rename (atomic on one filesystem).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


class ImageReadError(ValueError):
    """An image or mask file cannot be decoded."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; it replaces `path` on success.

    An existing `path` is moved aside first and only deleted once the new folder is in
    place, so a failure at any point leaves the old content as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = path.parent / f".{path.name}.old"
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, turning any decoder failure into ImageReadError."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"{path}: cannot decode image ({exc})") from exc


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale 16-bit (or float) pixel data to uint8; uint8 passes through."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        return (arr.astype(np.float64) / np.iinfo(arr.dtype).max * 255 + 0.5).astype(np.uint8)
    return (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)


def read_rgb(path: str | Path) -> np.ndarray:
    """An image as HxWx3 uint8: grayscale is replicated, alpha dropped, 16 bit scaled."""
    return to_rgb(open_image(path))


def to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("RGB", "L", "P", "RGBA", "LA", "CMYK", "YCbCr"):
        return np.asarray(im.convert("RGB"))
    arr = to_uint8(np.asarray(im))  # 16-bit modes ("I;16", "I") that PIL cannot convert to RGB
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def read_mask(path: str | Path) -> np.ndarray:
    """A mask as HxW uint8 grey levels (not yet binarised)."""
    im = open_image(path)
    if im.mode in ("1", "L", "P", "RGB", "RGBA", "LA"):
        return np.asarray(im.convert("L"))
    arr = to_uint8(np.asarray(im))
    return arr if arr.ndim == 2 else arr[..., 0]


def binarise(mask: np.ndarray) -> np.ndarray:
    """The foreground of a grey-level mask: > 127 (JPEG masks hold grey edges)."""
    return mask > 127
