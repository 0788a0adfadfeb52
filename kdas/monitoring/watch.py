"""Watch a folder of frames: profile them as the model's training frames were, compare, write
DIR/drift.json and DIR/report.html (`kdas monitor`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from kdas.io import atomic_dir, read_rgb, write_text
from kdas.monitoring.drift import Verdict, compare
from kdas.monitoring.frame_log import SERVED_LOG
from kdas.monitoring.profile import Reference, profile_files
from kdas.monitoring.report import write_report

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def frame_files(folder: Path, limit: int) -> list[Path]:
    """The last `limit` frames of `folder` by name (a log's names sort by time)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return files[-limit:]


def watch(images_dir: Path, model_file: Path, out: Path, *, max_frames: int, device: str, drift_share: float,
          name: str | None = None) -> Verdict:
    """Compare the frames in `images_dir` (image files, or a served model's frames.jsonl) with
    the reference profile `model_file` carries; writes out/drift.json, out/report.html and
    out/evidently.html (atomically: all or nothing). `name`: the model as the user named it."""
    from kdas.serving.inference import Segmenter

    name = name or str(model_file)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: no such folder of frames")
    segmenter = Segmenter.load(model_file, device)
    if segmenter.reference is None:
        raise ValueError(f"{name}: the model file carries no reference profile of its training frames "
                         "(trained before kdas wrote one, or with monitor.reference.frames 0): train it again")
    reference = Reference.from_payload(segmenter.reference, name)
    served = images_dir / SERVED_LOG
    if served.is_file():
        current = read_served_log(served, max_frames)
        files = frame_files(images_dir, max_frames)  # the frames it saved, if it was asked to
    else:
        files = frame_files(images_dir, max_frames)
        if not files:
            raise ValueError(f"{images_dir}: no frames ({', '.join(sorted(IMAGE_SUFFIXES))}) and no {SERVED_LOG}")
        with tqdm(total=len(files), desc="profiling frames", unit="frame", disable=None) as bar:
            table, embeddings = profile_files(segmenter, files, progress=bar)
        current = pd.concat([table, reference.project(embeddings)], axis=1)
    verdict = compare(reference.table, current, drift_share)
    shown = np.unique(np.linspace(0, len(files) - 1, min(6, len(files))).round().astype(int)) if files else []
    with atomic_dir(out) as tmp:
        write_text(tmp / "drift.json", json.dumps({**verdict.to_json(), "model": name, "images": str(images_dir)}, indent=2))
        write_report(tmp, verdict, reference.table, current, model=name, source=reference.source,
                     reference_frames=reference.thumbnails, current_frames=[read_rgb(files[i]) for i in shown])
    return verdict


def read_served_log(path: Path, limit: int) -> pd.DataFrame:
    """The last `limit` rows of a served model's frame log (JSON lines of numbers)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {number} is no JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {number} is no JSON object")
            rows.append({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not rows:
        raise ValueError(f"{path}: no frames logged yet")
    return pd.DataFrame(rows[-limit:])
