"""`kdas data import`: public release layouts in, one canonical layout out.

Canonical layout, the only one the rest of kdas reads:

    data/raw/<name>/images/<id>.<jpg|png>   images, bytes as released (TIFF/BMP become PNG)
    data/raw/<name>/masks/<id>.png          masks, 0/255

Recognised releases (searched anywhere below SRC): any `images|image` + `masks|mask`
pair (Kvasir-SEG, CVC-ColonDB, PraNet trees, plain folders) and `Original` +
`Ground Truth` (CVC-ClinicDB, PNG or TIFF). A PraNet `TestDataset/` holds several
datasets; each is imported under its own name.
"""

from __future__ import annotations

import logging
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from kdas.data.catalog import canonical_name
from kdas.io import IMAGE_EXTENSIONS, ImageReadError, atomic_dir, binarise, open_image, read_mask

log = logging.getLogger(__name__)

PAIR_FOLDERS = [("images", "masks"), ("image", "mask"), ("Original", "Ground Truth")]
COPY_AS_IS = {".jpg", ".jpeg", ".png"}  # already lossless-as-released; re-encoding would lose
GENERIC_NAMES = {"png", "tif", "tiff", "data", "dataset", "datasets", "images", "testdataset"}


class ImportError_(ValueError):
    """The source is not a dataset kdas can import; the message says what was found."""


@dataclass(frozen=True)
class FoundDataset:
    name: str
    images: Path
    masks: Path


def _listing(folder: Path) -> dict[str, Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    return {p.stem: p for p in sorted(files)}


def _derive_name(folder: Path, root: Path, root_label: str) -> str | None:
    """First catalogued name among the folder and its parents (up to SRC), else the first
    non-generic one; `root_label` stands for SRC itself (a zip's stem, not its scratch dir)."""
    names = [p.name for p in [folder, *folder.parents] if p.is_relative_to(root) and p != root] + [root_label]
    for n in names:
        if known := canonical_name(n):
            return known
    for n in names:
        if n and n.lower() not in GENERIC_NAMES:
            return re.sub(r"[^a-z0-9-]+", "-", n.lower()).strip("-")
    return None


def find_datasets(root: Path, root_label: str) -> list[FoundDataset]:
    found = []
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        if any(part.startswith((".", "__MACOSX")) for part in folder.relative_to(root).parts):
            continue
        for img_name, mask_name in PAIR_FOLDERS:
            if (folder / img_name).is_dir() and (folder / mask_name).is_dir():
                name = _derive_name(folder, root, root_label) or ""
                found.append(FoundDataset(name, folder / img_name, folder / mask_name))
    return found


def describe(root: Path) -> str:
    """What a folder holds, for an error message."""
    entries = sorted(p.relative_to(root).as_posix() + ("/" if p.is_dir() else "") for p in root.rglob("*"))
    shown = entries[:12] + ([f"... ({len(entries) - 12} more)"] if len(entries) > 12 else [])
    return ", ".join(shown) or "(empty)"


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a zip, refusing entries that would land outside `dest` or are links."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = (dest / info.filename).resolve()
            if info.filename.startswith(("/", "\\")) or ".." in Path(info.filename).parts or not target.is_relative_to(dest.resolve()):
                raise ImportError_(f"{archive}: entry '{info.filename}' escapes the archive's folder; refusing to extract")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ImportError_(f"{archive}: entry '{info.filename}' is a symbolic link; refusing to extract")
        zf.extractall(dest)


def _convert_image(src: Path, dst_dir: Path) -> None:
    """Copy JPEG/PNG bytes untouched; TIFF/BMP become PNG at their own bit depth."""
    open_image(src)  # full decode: a truncated or corrupt file fails here, named
    if src.suffix.lower() in COPY_AS_IS:
        ext = ".jpg" if src.suffix.lower() in (".jpg", ".jpeg") else ".png"
        shutil.copyfile(src, dst_dir / f"{src.stem}{ext}")
        return
    arr = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)  # keeps 16 bit; BGR in, BGR out
    if arr is None:
        raise ImageReadError(f"{src}: cannot decode image")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    cv2.imwrite(str(dst_dir / f"{src.stem}.png"), arr)


def _convert_mask(src: Path, dst_dir: Path, max_nonbinary: float) -> None:
    grey = read_mask(src)
    nonbinary = float(np.mean((grey > 32) & (grey < 223)))
    if nonbinary > max_nonbinary:
        raise ImportError_(
            f"{src}: not a binary mask ({nonbinary:.1%} of pixels are neither near 0 nor near 255; "
            f"at most {max_nonbinary:.0%} allowed, e.g. JPEG edges)"
        )
    Image.fromarray(binarise(grey).astype(np.uint8) * 255).save(dst_dir / f"{src.stem}.png")


def _pairs(found: FoundDataset) -> list[tuple[Path, Path]]:
    images, masks = _listing(found.images), _listing(found.masks)
    lonely_images = sorted(set(images) - set(masks))
    lonely_masks = sorted(set(masks) - set(images))
    problems = [f"image without mask: {images[k]}" for k in lonely_images[:10]]
    problems += [f"mask without image: {masks[k]}" for k in lonely_masks[:10]]
    if problems:
        more = len(lonely_images) + len(lonely_masks) - len(problems)
        raise ImportError_("unpaired files (pairs match by file name without extension):\n  " + "\n  ".join(problems) + (f"\n  ... and {more} more" if more > 0 else ""))
    if not images:
        raise ImportError_(f"{found.images}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [(images[k], masks[k]) for k in sorted(images)]


def import_one(found: FoundDataset, raw_root: Path, *, max_nonbinary: float, workers: int = 4) -> Path:
    pairs = _pairs(found)
    target = raw_root / found.name
    with atomic_dir(target) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()

        def convert(pair: tuple[Path, Path]) -> None:
            _convert_image(pair[0], tmp / "images")
            _convert_mask(pair[1], tmp / "masks", max_nonbinary)

        with ThreadPoolExecutor(workers) as pool:  # PIL and cv2 release the GIL while decoding
            list(tqdm(pool.map(convert, pairs), total=len(pairs), desc=f"import {found.name}", unit="pair", disable=None))
    log.info("imported %d pairs into %s", len(pairs), target)
    return target


def dvc_track(path: Path) -> None:
    """`dvc add` the folder when the project is a DVC repository (and it is no stage output)."""
    repo_root = Path.cwd()
    if not (repo_root / ".dvc").is_dir():
        log.info("not a DVC repository: %s is not tracked (run `dvc init` to version data)", path)
        return
    subprocess.run([sys.executable, "-m", "dvc", "add", "--quiet", str(path)], check=True, cwd=repo_root)


def import_dataset(src: str | Path, raw_root: str | Path = "data/raw", *, name: str | None = None, max_nonbinary: float = 0.05, track: bool = True) -> list[Path]:
    """Import every dataset found in SRC (folder or .zip); returns the folders written."""
    src, raw_root = Path(src), Path(raw_root)
    if not src.exists():
        raise ImportError_(f"{src}: no such file or folder")
    with tempfile.TemporaryDirectory(prefix="kdas-import-") as scratch:
        root = src
        if src.is_file():
            if not zipfile.is_zipfile(src):
                raise ImportError_(f"{src}: not a folder or a .zip archive")
            root = Path(scratch)
            safe_extract(src, root)
        found = find_datasets(root, src.stem if src.is_file() else src.name)
        if not found:
            raise ImportError_(
                f"{src}: no dataset layout recognised. Found: {describe(root)}. Expected image/mask folder pairs: "
                "images/ + masks/ (Kvasir-SEG, CVC-ColonDB, any dataset), image/ + mask/ (PraNet TrainDataset), "
                "Original/ + 'Ground Truth'/ (CVC-ClinicDB, PNG or TIFF)"
            )
        if name is not None:
            if len(found) > 1:
                raise ImportError_(f"{src}: holds {len(found)} datasets ({', '.join(f.name for f in found)}); --name applies to one only")
            found = [FoundDataset(name, found[0].images, found[0].masks)]
        for f in found:
            if not f.name:
                raise ImportError_(f"{f.images.parent}: cannot tell the dataset's name; pass --name")
        written = [import_one(f, raw_root, max_nonbinary=max_nonbinary) for f in found]
    if track:
        for path in written:
            dvc_track(path)
    return written
