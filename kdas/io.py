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
import re
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


def target_of(name: str) -> str:
    """The output a temporary sibling of _temporary stands for (any other name as it is): an
    error names the file the user asked for."""
    return re.sub(r"(^|/)\.([^/]+)\.\d+\.[0-9a-f]{8}\.tmp$", r"\1\2", name)


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
        with contextlib.suppress(OSError):  # (a read-only folder) the write's own error is the one to see
            tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, writer: str = "kdas") -> Iterator[Path]:
    """Yield a temporary folder next to `path`; it replaces `path` on success.

    An existing `path` is moved aside to `.<name>.old` first and only deleted once the new
    folder is in place, so a failure at any point leaves the old content as it was (after
    a kill between the two renames, the next run puts `.<name>.old` back). An existing
    `path` that kdas did not write (no MARKER in it) and that is not empty is refused, and so
    is one that another kdas `writer` made (`kdas data synth` never replaces an import).
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
    made_by = _writer(path / MARKER)
    if writer != "kdas" and made_by not in (None, "kdas", writer):  # "kdas": a writer that may replace any kdas folder
        raise ForeignFolderError(f"{path}: written by {made_by}, which `{writer}` does not replace: choose another output, or "
                                 "move it away yourself")
    tmp = _temporary(path)
    tmp.mkdir()
    (tmp / MARKER).write_text(f"Written by {writer}, which may replace this folder.\n")
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _writer(marker: Path) -> str | None:
    """Which kdas command a folder's marker says wrote it ("kdas": one written before markers named it)."""
    if not marker.is_file():
        return None
    found = re.match(r"Written by (.+?), which may replace this folder", marker.read_text(errors="replace"))
    return found.group(1) if found else "kdas"


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


def unreadable_name(path: Path) -> str | None:
    """Why a file's name cannot be a sample id (None: it can): ids travel through parquet,
    MLflow and HTML as text, and a name that is not valid UTF-8 breaks each of them."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        shown = path.parent / repr(os.fsencode(path.name))[2:-1]
        return f"{shown}: its name is not valid UTF-8; rename it (ids are file names, kept as text)"
    return None


def read_mask(path: str | Path) -> np.ndarray:
    """A mask as HxW uint8 grey levels 0-255, foreground above 127 (binarise), decided from
    what the file holds; the policy, where a choice had to be made, is:

    - a palette mask whose entries in use are all grey is read as those grey levels; any
      other palette mask is a label map: its black entries (index 0 where none is black)
      are background, every other index foreground;
    - otherwise the brightest colour channel counts (blue on black is a polyp; luminance
      would make it level 29), or the alpha channel where only the alpha draws;
    - a mask of exactly two values is binary whatever they are (0/1, 0/20, 0/100, 0/65535):
      the higher is foreground; a mask of one value is empty at 0, all foreground above 127;
    - a mask of more values (a JPEG, with noise near 0 and 255 and grey edges) keeps its
      levels, on the scale its values call for (mask_levels), for callers to refuse a soft
      one (nonbinary_fraction), and must hold its foreground near 255.

    Two-valued and label-map masks come back 0/255. Where the policy cannot tell the
    foreground (more values none near 255, one dark value, a palette with neither black
    nor index 0), MaskReadError names the file, what it holds and the rule: never an empty
    label from a mask that holds something."""
    return mask_from_image(open_image(path), path)


NEAR = 32  # levels within this of 0 or 255 are a binary mask's JPEG noise (nonbinary_fraction's margin)


class MaskReadError(ImageReadError):
    """A mask file decodes, but which of its pixels are foreground cannot be told (read_mask's policy)."""


def _distinct(values: np.ndarray) -> np.ndarray:
    if values.dtype == np.uint8:  # the common case, read once per sample in training: a histogram, no sort
        return np.flatnonzero(np.bincount(values.ravel(), minlength=256)).astype(np.uint8)
    return np.unique(values)


def _shown(values: np.ndarray, limit: int = 6) -> str:
    items = [f"{v:g}" if isinstance(v, float) else str(v) for v in values.tolist()]
    return ", ".join(items) if len(items) <= limit else f"{items[0]}..{items[-1]} ({len(items)} values)"


def _palette_mask(im: Image.Image, path: str | Path) -> np.ndarray:
    """A palette image: its grey levels where every entry it uses is grey (the palette only
    stores levels), else a label map: black entries (or index 0 where none is) background,
    every other index foreground, as 0/255."""
    arr = np.asarray(im)
    idx = arr[..., 0] if arr.ndim == 3 else arr  # PA: index, alpha
    palette = np.zeros((256, 3), np.uint8)
    entries = np.asarray(im.getpalette("RGB") or [], np.uint8).reshape(-1, 3)[:256]
    palette[: len(entries)] = entries
    used = _distinct(idx)
    colours = palette[used]
    if (colours.min(axis=1) == colours.max(axis=1)).all():
        return palette[idx, 0]
    background = used[colours.max(axis=1) == 0]
    if background.size == 0:
        if 0 not in used:
            found = ", ".join(f"{i}={tuple(int(c) for c in palette[i])}" for i in used[:6])
            raise MaskReadError(f"{path}: palette mask with indices {found}{', ...' if used.size > 6 else ''}, none black and "
                                "no index 0: cannot tell its background (kdas reads a palette mask's black entries, else index 0, "
                                "as background); save it with background black or index 0")
        background = np.array([0])
    return np.where(np.isin(idx, background), 0, 255).astype(np.uint8)


def _mask_values(im: Image.Image, path: str | Path) -> np.ndarray:
    """The one HxW array of values a mask file holds, on its own scale: palette resolved,
    colour channels merged by their maximum (blue on black is a polyp, which luminance would
    make level 29), alpha used where the colour is uniform and only the alpha draws."""
    if im.mode in ("P", "PA"):
        return _palette_mask(im, path)
    if im.mode == "1":
        return np.asarray(im.convert("L"))
    if im.mode not in ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = im.convert("RGBA" if "A" in im.getbands() or "a" in im.getbands() else "RGB")  # CMYK, YCbCr, La, RGBa...
    arr = np.asarray(im)
    if arr.ndim == 2:
        return arr
    colour = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    if im.mode in ("LA", "RGBA"):
        alpha = arr[..., -1]
        if colour.min() == colour.max() and alpha.min() != alpha.max():
            return alpha
    return colour


def mask_from_image(im: Image.Image, path: str | Path) -> np.ndarray:
    """read_mask's decision on a decoded image; `path` names it in a refusal."""
    values = _mask_values(im, path)
    distinct = _distinct(values)
    if distinct.size == 2:  # binary whatever the two levels (0/1, 0/20, 0/100, 0/65535): the higher is foreground
        if values.dtype == np.uint8 and distinct.tolist() == [0, 255]:
            return values  # canonical already (data/raw), as training reads it
        return np.where(values == distinct[1], 255, 0).astype(np.uint8)
    levels = mask_levels(values)
    if distinct.size < 2:
        if levels.size and 0 < int(levels.flat[0]) <= 127:
            raise MaskReadError(f"{path}: one value ({_shown(distinct)}) in every pixel: cannot tell a dark foreground "
                                "covering the frame from a background (kdas reads a one-valued mask as empty at 0, all foreground "
                                "above 127); save it with background 0 and foreground 255")
        return levels
    top = int(levels.max())
    if top < 255 - NEAR:
        above = float(np.mean(levels > 127))
        scale = "" if values.dtype == np.uint8 else f", {int(levels.min())}..{top} of 255"
        raise MaskReadError(f"{path}: mask values {_shown(distinct)}{scale}, none near 255 (above {254 - NEAR}), "
                            f"{'no pixel' if not above else f'{above:.1%} of pixels'} above 127: its foreground is dark or faint "
                            "(kdas reads a mask of more than two values, e.g. a JPEG, as foreground above 127 with it near 255; "
                            "one of exactly two values as binary); save the mask with foreground 255, or losslessly with two values")
    return levels


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
    """The foreground of read_mask's grey levels: > 127 (JPEG masks hold grey edges; read_mask
    has already made a two-valued, palette or colour mask 0/255, or refused it)."""
    return mask > 127


def nonbinary_fraction(mask: np.ndarray) -> float:
    """The share of a grey-level mask's pixels near neither 0 nor 255 (more than 32 levels
    from both): a soft or blurred mask, not the few grey edges of a JPEG-saved binary one.
    The importer refuses, and the data contract fails, above validation.max_nonbinary_fraction."""
    return float(np.mean((mask > 32) & (mask < 223)))
