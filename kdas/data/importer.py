"""`kdas data import`: public release layouts in, one canonical layout out.

Canonical layout, the only one the rest of kdas reads:

    data/raw/<name>/images/<id>.<jpg|png>   images, bytes as released (TIFF/BMP become PNG)
    data/raw/<name>/masks/<id>.png          masks, 0/255 (foreground as kdas.io.read_mask decides it)

Recognised releases (searched anywhere below SRC): any `images|image` + `masks|mask`
pair (Kvasir-SEG, CVC-ColonDB, PraNet trees, plain folders) and `Original` +
`Ground Truth` (CVC-ClinicDB, PNG or TIFF). A PraNet `TestDataset/` holds several
datasets; each is imported under its own name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from kdas.config import DATASET_NAME
from kdas.data.catalog import CATALOG, canonical_name
from kdas.io import IMAGE_EXTENSIONS, ImageReadError, atomic_dir, binarise, nonbinary_fraction, open_image, pid_alive, read_mask, unreadable_name

log = logging.getLogger(__name__)

PAIR_FOLDERS = [("images", "masks"), ("image", "mask"), ("Original", "Ground Truth")]
COPY_AS_IS = {".jpg", ".jpeg", ".png"}  # already lossless-as-released; re-encoding would lose
GENERIC_NAMES = {"png", "tif", "tiff", "data", "dataset", "datasets", "images", "testdataset"}
# What an archive may expand to. The largest public releases (PraNet's train and test sets)
# hold ~3,000 files and ~1 GB unpacked; one frame, even a 16-bit TIFF, is well under 256 MiB.
MAX_ENTRIES = 100_000
MAX_ENTRY_BYTES = 256 << 20
MAX_TOTAL_BYTES = 16 << 30
# Images and masks barely compress (JPEG, PNG; TIFF a few times): an archive that expands
# past MAX_RATIO times its size (and past one entry's limit) is a bomb, even within the totals
MAX_RATIO = 100
CHUNK = 1 << 20
SCRATCH = "kdas-import-"  # + pid: where a zip is extracted (the system's temporary folder)


class ImportError_(ValueError):
    """The source is not a dataset kdas can import; the message says what was found."""


@dataclass(frozen=True)
class FoundDataset:
    name: str
    images: Path
    masks: Path


def _listing(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Files by id (name without extension), and a problem for each id held by several files
    (a.jpg + a.png: which one is the frame cannot be guessed)."""
    by_stem: dict[str, list[Path]] = {}
    problems = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
            if (why := unreadable_name(p)) is not None:
                problems.append(why)
                continue
            by_stem.setdefault(p.stem, []).append(p)
    problems += [f"{files[0]}: same id as {', '.join(p.name for p in files[1:])} (ids are file names without extension)"
                 for files in by_stem.values() if len(files) > 1]
    return {stem: files[0] for stem, files in by_stem.items()}, problems


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
        # a linked folder is another name for data found elsewhere: it imported it twice
        if any((root / Path(*folder.relative_to(root).parts[: k + 1])).is_symlink() for k in range(len(folder.relative_to(root).parts))):
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


def check_name(name: str) -> str:
    """A dataset name is one plain folder under data/raw, and not one a pipeline stage writes."""
    generated = sorted(e.name for e in CATALOG.values() if e.generated)
    if not DATASET_NAME.fullmatch(name) or canonical_name(name) in generated:
        raise ImportError_(
            f"invalid dataset name {name!r}: use 1 to 64 lower-case letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit (no path); {', '.join(generated)} is written by the pipeline and cannot be imported"
        )
    return name


def safe_extract(archive: Path, dest: Path, *, max_entries: int = MAX_ENTRIES, max_entry_bytes: int = MAX_ENTRY_BYTES,
                 max_total_bytes: int = MAX_TOTAL_BYTES) -> None:
    """Extract a zip within limits. Entries that would land outside `dest`, links, a name that
    is both a file and a folder, too many entries and declared sizes over the limits are
    refused before anything is written; bytes are also counted while writing, so a header
    that understates a size gains nothing. A corrupt archive or entry is named."""
    entry = None
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > max_entries:
                raise ImportError_(f"{archive}: {len(infos)} entries, at most {max_entries} allowed; refusing to extract")
            for info in infos:
                target = (dest / info.filename).resolve()
                if info.filename.startswith(("/", "\\")) or ".." in Path(info.filename).parts or not target.is_relative_to(dest.resolve()):
                    raise ImportError_(f"{archive}: entry '{info.filename}' escapes the archive's folder; refusing to extract")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ImportError_(f"{archive}: entry '{info.filename}' is a symbolic link; refusing to extract")
                if info.file_size > max_entry_bytes:
                    raise ImportError_(f"{archive}: entry '{info.filename}' expands to {info.file_size} bytes, "
                                       f"at most {max_entry_bytes} allowed; refusing to extract")
            files = {PurePosixPath(info.filename) for info in infos if not info.is_dir()}
            folders = {folder for info in infos for folder in PurePosixPath(info.filename.rstrip("/")).parents}
            folders |= {PurePosixPath(info.filename.rstrip("/")) for info in infos if info.is_dir()}
            if clash := sorted(files & folders):  # extracting one would fail on the other
                raise ImportError_(f"{archive}: '{clash[0]}' is both a file and a folder in it; refusing to extract")
            declared = sum(info.file_size for info in infos)
            max_total_bytes = min(max_total_bytes, max(max_entry_bytes, MAX_RATIO * archive.stat().st_size))
            if declared > max_total_bytes:
                raise ImportError_(f"{archive}: expands to {declared} bytes, at most {max_total_bytes} allowed (the least of "
                                   f"{MAX_RATIO} times its size or one entry's limit, and the total limit); refusing to extract")
            total = 0
            for entry in infos:
                target = dest / entry.filename
                if entry.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with zf.open(entry) as src, target.open("wb") as out:
                    while block := src.read(CHUNK):
                        written += len(block)
                        total += len(block)
                        if written > max_entry_bytes or total > max_total_bytes:
                            raise ImportError_(f"{archive}: entry '{entry.filename}' expands beyond its declared {entry.file_size} "
                                               f"bytes and the limits ({max_entry_bytes} per entry, {max_total_bytes} in all); refusing to extract")
                        out.write(block)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:  # zipfile's ways to fail on bad data
        where = f"entry '{entry.filename}' is corrupt" if entry else "not a readable zip archive"
        raise ImportError_(f"{archive}: {where} ({exc})") from None


def _convert_image(src: Path, dst_dir: Path) -> tuple[int, int]:
    """Copy JPEG/PNG bytes untouched; TIFF/BMP become PNG at their own bit depth. Returns (width, height)."""
    size = open_image(src).size  # full decode: a truncated or corrupt file fails here, named
    if src.suffix.lower() in COPY_AS_IS:
        ext = ".jpg" if src.suffix.lower() in (".jpg", ".jpeg") else ".png"
        shutil.copyfile(src, dst_dir / f"{src.stem}{ext}")
        return size
    arr = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)  # keeps 16 bit; BGR in, BGR out
    if arr is None:
        raise ImageReadError(f"{src}: cannot decode image")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    cv2.imwrite(str(dst_dir / f"{src.stem}.png"), arr)
    return size


def _convert_mask(src: Path, dst_dir: Path, max_nonbinary: float) -> tuple[int, int]:
    """Write the mask as 0/255 PNG, its foreground decided by read_mask's policy
    (palette labels, any colour channel, two values, 0/1 or 16-bit scales), which refuses a mask
    whose foreground it cannot tell (a dark one); refuse a soft one. Returns (width, height)."""
    grey = read_mask(src)
    nonbinary = nonbinary_fraction(grey)
    if nonbinary > max_nonbinary:
        raise ImportError_(
            f"{src}: not a binary mask ({nonbinary:.1%} of pixels are neither near 0 nor near 255; "
            f"at most {max_nonbinary:.0%} allowed, e.g. JPEG edges)"
        )
    foreground = binarise(grey)
    if not foreground.any() and grey.any():  # read_mask's policy leaves no such mask; never write one regardless
        raise ImportError_(f"{src}: mask values up to {int(grey.max())} of 255 but none above 127: an empty label from a "
                           "non-empty mask; save the mask with foreground 255")
    Image.fromarray(foreground.astype(np.uint8) * 255).save(dst_dir / f"{src.stem}.png")
    return grey.shape[1], grey.shape[0]


def _convert_all(found: FoundDataset, out: Path, *, max_nonbinary: float, workers: int) -> list[str]:
    """Convert every pair of `found` into `out`; returns every problem met (unpaired,
    duplicate, undecodable files, soft masks, masks whose foreground cannot be told), so that a release is judged in one pass."""
    (images, image_dups), (masks, mask_dups) = _listing(found.images), _listing(found.masks)
    problems = image_dups + mask_dups
    problems += [f"{images[k]}: image without mask" for k in sorted(set(images) - set(masks))]
    problems += [f"{masks[k]}: mask without image" for k in sorted(set(masks) - set(images))]
    if not images:
        problems.append(f"{found.images}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    (out / "images").mkdir()
    (out / "masks").mkdir()

    def convert(stem: str) -> list[str]:
        found_here, sizes = [], []
        for step in (lambda: _convert_image(images[stem], out / "images"), lambda: _convert_mask(masks[stem], out / "masks", max_nonbinary)):
            try:
                sizes.append(step())
            except ValueError as exc:  # ImageReadError, ImportError_: a bad file, named
                found_here.append(str(exc))
        if len(sizes) == 2 and sizes[0] != sizes[1]:
            (iw, ih), (mw, mh) = sizes
            found_here.append(f"{masks[stem]}: mask is {mw}x{mh} px, its image {images[stem].name} is {iw}x{ih} px (they must match)")
        return found_here

    paired = sorted(set(images) & set(masks))
    with ThreadPoolExecutor(workers) as pool:  # PIL and cv2 release the GIL while decoding
        for found_here in tqdm(pool.map(convert, paired), total=len(paired), desc=f"import {found.name}", unit="pair", disable=None):
            problems += found_here
    return problems


def _scratch() -> tempfile.TemporaryDirectory:
    """A temporary folder named after this process, for a zip's contents; those of killed
    imports (their process gone) are removed first, or they would stay forever."""
    for stale in Path(tempfile.gettempdir()).glob(f"{SCRATCH}*"):
        pid = stale.name.removeprefix(SCRATCH).split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{SCRATCH}{os.getpid()}-")


def dvc_track(path: Path) -> None:
    """`dvc add` the folder when the project is a DVC repository (and it is no stage output)."""
    repo_root = Path.cwd()
    if not (repo_root / ".dvc").is_dir():
        log.info("not a DVC repository: %s is not tracked (run `dvc init` to version data)", path)
        return
    subprocess.run([sys.executable, "-m", "dvc", "add", "--quiet", str(path)], check=True, cwd=repo_root)


def import_dataset(src: str | Path, raw_root: str | Path = "data/raw", *, name: str | None = None, max_nonbinary: float,
                   track: bool = True, workers: int = 4) -> list[Path]:
    """Import every dataset found in SRC (folder or .zip); returns the folders written.

    All or nothing: every problem of every dataset in SRC is listed in one error, and then
    nothing is written. `max_nonbinary`: params.yaml `validation.max_nonbinary_fraction`."""
    src, raw_root = Path(src), Path(raw_root)
    if name is not None:  # an alias ('kvasir') is imported under its catalogue name, which its published split follows
        name = canonical_name(check_name(name)) or name
    if not src.exists():
        raise ImportError_(f"{src}: no such file or folder")
    with _scratch() as scratch:
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
            check_name(f.name)  # a folder called e.g. 'synth' must not replace a stage's output either
        with contextlib.ExitStack() as commit:  # each folder replaces its old version only if all succeed
            problems = []
            for f in found:
                tmp = commit.enter_context(atomic_dir(raw_root / f.name, "kdas data import"))
                problems += _convert_all(f, tmp, max_nonbinary=max_nonbinary, workers=workers)
            if problems:
                text = f"{src}: {len(problems)} problem(s), nothing imported:\n  " + "\n  ".join(problems)
                raise ImportError_(text.replace(str(root), str(src)) if root != src else text)  # name files as in the archive
        written = [raw_root / f.name for f in found]
    for path in written:
        log.info("imported %s", path)
        if track:
            dvc_track(path)
    return written
