"""Small file helpers shared by every stage: atomic writes and image decoding.

A failed run must never leave a half-written dataset, checkpoint or report behind, so
every writer goes through `atomic_path` / `atomic_dir`: write to a temporary sibling
`.<name>.<pid>.<random>.tmp`, then rename (atomic on one filesystem). The temporary is
removed on failure; one left by a killed process (its pid gone) is removed when the next
writer of the same target starts. A folder is only ever replaced if kdas made it (its
marker file is in it) or it is empty: never a user's folder or a parent of datasets.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from filelock import FileLock, Timeout
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# Larger images are refused from the header, before decoding: PIL's own bomb threshold
# (~89 Mpx, 9459 px square; colonoscopy frames are ~2 Mpx), which it only warns about.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


# In every folder atomic_dir writes: what kdas made, kdas may replace
MARKER = ".kdas-made"


class ImageReadError(ValueError):
    """An image or mask file cannot be decoded."""


class ForeignFolderError(ValueError):
    """A folder kdas would replace holds something kdas did not write."""


class FolderBusyError(RuntimeError):
    """Another process holds the lock of an output folder."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _temporary(path: Path) -> Path:
    """A fresh sibling name for `path`, after sweeping those left by dead processes.

    Not created here: the writer creates it, so it gets the process's normal permissions
    (mkstemp/mkdtemp would make it 0600/0700, and the rename would keep that)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        pid = stale.name.removeprefix(f".{path.name}.").split(".")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path next to `path` (not yet created); rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _temporary(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; it replaces `path` on success.

    An existing `path` is moved aside to `.<name>.old` first and only deleted once the new
    folder is in place, so a failure at any point leaves the old content as it was (after
    a kill between the two renames, the next run puts `.<name>.old` back). An existing
    `path` that kdas did not write (no MARKER in it) and that is not empty is refused.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.parent / f".{path.name}.old"
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
    if path.is_symlink() or path.exists() and not (path.is_dir() and ((path / MARKER).is_file() or not any(path.iterdir()))):
        raise ForeignFolderError(f"{path}: exists and has no {MARKER} file (kdas marks the folders it writes, and replaces "
                                 "only those): choose another output, or move it away yourself")
    tmp = _temporary(path)
    tmp.mkdir()
    (tmp / MARKER).write_text("Written by kdas, which may replace this folder.\n")
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def exclusive(path: str | Path, holder: str, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold the OS lock of file `path` while the block runs, with `holder` written in it; a
    second process gets `busy(who holds it)` at once. The OS releases the lock when the
    process ends, SIGKILL included; the file stays (deleting it would let two processes lock
    two different files)."""
    path = Path(path)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise busy(path.read_text().strip() or "another process") from None
    try:
        path.write_text(f"pid {os.getpid()} ({holder})\n")
        yield
    finally:
        lock.release()


def folder_lock(folder: str | Path, holder: str) -> contextlib.AbstractContextManager[None]:
    """Hold the lock of an output folder while writing into it: a second writer (a second
    training into the same --out, or one started beside an orphan of a killed `dvc repro`)
    stops at once, named."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return exclusive(folder / ".kdas.lock", holder, lambda who: FolderBusyError(
        f"{folder}: {who} is writing into it; wait for it to end or stop it, or write elsewhere (--out)"))


def unreachable(url: str, timeout: float) -> str | None:
    """Why the host of an http(s) `url` takes no TCP connection within `timeout` s, or None
    when it does: a quick probe before clients that retry for minutes."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "localhost", port), timeout=timeout).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def open_image(path: str | Path, max_side: int | None = None) -> Image.Image:
    """Open and fully decode an image, turning any decoder failure, and a header declaring
    more than MAX_IMAGE_PIXELS (a decompression bomb) or a side over `max_side`
    (validation.max_size, where a caller holds params), into ImageReadError naming the file."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ImageReadError(f"{path}: image too large ({im.width}x{im.height} px declared; at most {MAX_IMAGE_PIXELS} pixels)")
            if max_side is not None and max(im.size) > max_side:
                raise ImageReadError(f"{path}: image too large ({im.width}x{im.height} px; at most {max_side} px a side, "
                                     "validation.max_size in params.yaml)")
            im.load()
            return im.copy()
    except ImageReadError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
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


def read_rgb(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """An image as HxWx3 uint8: grayscale is replicated, alpha dropped, 16 bit scaled."""
    return to_rgb(open_image(path, max_side))


def to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("RGB", "L", "P", "RGBA", "LA", "CMYK", "YCbCr"):
        return np.asarray(im.convert("RGB"))
    arr = to_uint8(np.asarray(im))  # 16-bit modes ("I;16", "I") that PIL cannot convert to RGB
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def read_mask(path: str | Path) -> np.ndarray:
    """A mask as HxW uint8 grey levels 0-255 (not yet binarised), whatever its stored scale:
    0/1, 0/255 or 16-bit (see mask_levels)."""
    im = open_image(path)
    arr = np.asarray(im.convert("L")) if im.mode in ("1", "L", "P", "RGB", "RGBA", "LA") else np.asarray(im)
    return mask_levels(arr if arr.ndim == 2 else arr[..., 0])


def mask_levels(mask: np.ndarray) -> np.ndarray:
    """Integer grey levels on the 0-255 scale. Masks are stored on several scales: 0/1 (many
    releases), 0/255, 0/65535, or 8-bit values in a 16-bit file; each is read on the smallest
    of 1, 255 and the type's maximum that holds its largest value, so a 0/1 mask is not
    taken for an empty one (and a soft mask stays soft, for the importer to refuse)."""
    if not np.issubdtype(mask.dtype, np.integer) or mask.size == 0:
        return to_uint8(mask)
    top = int(mask.max())
    scale = 1 if top <= 1 else 255 if top <= 255 else np.iinfo(mask.dtype).max
    if scale == 255 and mask.dtype == np.uint8:
        return mask
    return (np.clip(mask, 0, None).astype(np.float64) / scale * 255 + 0.5).astype(np.uint8)


def binarise(mask: np.ndarray) -> np.ndarray:
    """The foreground of a grey-level mask: > 127 (JPEG masks hold grey edges)."""
    return mask > 127


def nonbinary_fraction(mask: np.ndarray) -> float:
    """The share of a grey-level mask's pixels near neither 0 nor 255 (more than 32 levels
    from both): a soft or blurred mask, not the few grey edges of a JPEG-saved binary one.
    The importer refuses, and the data contract fails, above validation.max_nonbinary_fraction."""
    return float(np.mean((mask > 32) & (mask < 223)))
