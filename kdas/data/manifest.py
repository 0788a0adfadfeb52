"""`kdas data manifest`: one row per image/mask pair, in a parquet file.

The manifest is what validation checks and what training reads. Rows whose files have
not changed since the last run (same path and sha256) are reused, so a re-run after
adding a few images only reads those.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from kdas.config import SplitParams
from kdas.data.splits import assign_splits
from kdas.io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    atomic_path,
    binarise,
    file_sha256,
    nonbinary_fraction,
    open_image,
    read_mask,
    to_rgb,
    unreadable_name,
)

log = logging.getLogger(__name__)

# Content, not mtimes, decides what is re-read: the manifest (and so its DVC hash) is then
# the same in every clone that holds the same files.
FILE_KEY = ["image_path", "image_sha256", "mask_path", "mask_sha256"]


def sha256(path: str) -> str:
    return file_sha256(path) if path else ""


def phash(grey: np.ndarray) -> int:
    """64-bit DCT perceptual hash: near-duplicates (re-encoded, resized) differ in few bits."""
    small = cv2.resize(grey.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def _describe_image(path: str) -> dict:
    im = open_image(path)
    row = {"mode": im.mode, "width": im.width, "height": im.height}
    rgb = to_rgb(im)
    row["channels"] = rgb.shape[2]
    row["mean_r"], row["mean_g"], row["mean_b"] = (float(v) for v in rgb.reshape(-1, 3).mean(0))
    row["phash"] = f"{phash(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)):016x}"
    return row


def describe_pair(image_path: str, mask_path: str) -> dict:
    """Everything the data contract checks about one pair; a decode failure goes to `error`."""
    row: dict = {"image_path": image_path, "mask_path": mask_path, "error": ""}
    row["image_sha256"], row["mask_sha256"] = sha256(image_path), sha256(mask_path)
    errors = []
    if not image_path:
        errors.append(f"{mask_path}: mask without image")
    else:
        try:
            row.update(_describe_image(image_path))
        except ImageReadError as exc:
            errors.append(str(exc))
    if not mask_path:
        errors.append(f"{image_path}: image without mask")
    else:
        try:
            grey = read_mask(mask_path)
            row["mask_width"], row["mask_height"] = grey.shape[1], grey.shape[0]
            row["foreground_fraction"] = float(np.mean(binarise(grey)))
            row["nonbinary_fraction"] = nonbinary_fraction(grey)
        except ImageReadError as exc:
            errors.append(str(exc))
    row["error"] = "; ".join(errors)
    return row


def list_pairs(raw_root: Path, dataset: str) -> list[tuple[str, str, str]]:
    """(id, image path, mask path) for every file of data/raw/<dataset>; '' where one side is missing."""
    folder = raw_root / dataset
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such dataset; import it (`kdas data import`) or generate it (`kdas data synth`)")

    def files(sub: str) -> dict[str, str]:
        d = folder / sub
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: missing; a dataset folder holds images/ and masks/")
        found: dict[str, Path] = {}
        for p in sorted(d.iterdir()):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                if p.stem in found:  # which one is the frame cannot be guessed; one was dropped silently
                    raise ValueError(f"{p}: same id as {found[p.stem].name} (ids are file names without extension); keep one")
                found[p.stem] = p
        for p in found.values():  # a link to /dev/zero would be read forever, a FIFO block the reader
            if (why := unreadable_name(p)) is not None:
                raise ValueError(why)
            if not p.is_file():
                raise ValueError(f"{p}: not a regular file (a device, FIFO, folder or broken link); a dataset holds image files only")
        return {stem: str(p) for stem, p in found.items()}

    images, masks = files("images"), files("masks")
    return [(k, images.get(k, ""), masks.get(k, "")) for k in sorted(set(images) | set(masks))]


def build_manifest(raw_root: str | Path, datasets: list[str], split: SplitParams, previous: pd.DataFrame | None = None,
                   workers: int | None = None, *, near_duplicate_distance: int) -> pd.DataFrame:
    """Describe every pair and assign splits; val is drawn by near-duplicate group (splits.py)."""
    raw_root = Path(raw_root)
    listed = [(ds, i, img, mask) for ds in datasets for i, img, mask in list_pairs(raw_root, ds)]
    cached: dict[tuple, dict] = {}
    if previous is not None and len(previous):
        for rec in previous.to_dict("records"):
            cached[tuple(rec[k] for k in FILE_KEY)] = rec
    rows: list[dict | None] = []
    todo = []
    for n, (ds, i, img, mask) in enumerate(listed):
        key = (img, sha256(img), mask, sha256(mask))
        rows.append(cached.get(key))
        if rows[-1] is None:
            todo.append(n)
    log.info("manifest: %d pairs, %d unchanged, %d to read", len(listed), len(listed) - len(todo), len(todo))
    if todo:
        with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
            futures = pool.map(describe_pair, [listed[n][2] for n in todo], [listed[n][3] for n in todo], chunksize=8)
            for n, row in zip(todo, tqdm(futures, total=len(todo), desc="manifest", unit="pair", disable=None)):
                rows[n] = row
    for (ds, i, _, _), row in zip(listed, rows):
        row.update(dataset=ds, id=i)
    df = pd.DataFrame(rows)
    df["split"] = assign_splits(df, split, near_duplicate_distance) if len(df) else pd.Series(dtype="str")
    first = ["dataset", "id", "split", "image_path", "mask_path", "width", "height", "channels", "mode", "mask_width", "mask_height",
             "foreground_fraction", "nonbinary_fraction", "mean_r", "mean_g", "mean_b", "image_sha256", "phash", "error"]
    for col in first:
        if col not in df:
            df[col] = pd.NA
    return df[first + [c for c in df.columns if c not in first]]


def data_id(rows: pd.DataFrame) -> str:
    """Which data, by content: the datasets' names and a hash of the rows' image and mask
    bytes (their sha256), e.g. ``cvc-colondb,kvasir-seg@3f2a9c01d4e5``. The same pairs give
    the same id in any clone; one changed mask changes it."""
    names = ",".join(sorted(rows["dataset"].astype(str).unique()))
    keys = sorted(rows["dataset"].astype(str) + "/" + rows["id"].astype(str) + ":" + rows["image_sha256"].astype(str) + ":"
                  + rows["mask_sha256"].astype(str))
    return f"{names}@{hashlib.sha256(chr(10).join(keys).encode()).hexdigest()[:12]}"


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; build it with `kdas data manifest`")
    return pd.read_parquet(path)


def write_manifest(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
