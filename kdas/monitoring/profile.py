"""What a frame looks like to a monitor: a few image statistics, the prediction's statistics
and the model's own view of it (its pooled encoder embedding, projected on the principal
axes of the training frames'), one row of numbers per frame.

A model file carries the profile of its training frames (`Reference`, written when training
ends): the monitor compares new frames with it and needs nothing but the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from kdas.io import read_rgb
from kdas.maps import prepare, resize

# the frame itself, at the model's input size (so that sharpness means the same at any
# resolution), and its size as it came
FRAME_FEATURES = ("brightness", "contrast", "saturation", "red", "green", "blue", "sharpness", "height", "width")
# the calibrated map at the frame's size: how much is polyp, how sure the model is
PREDICTION_FEATURES = ("predicted_area", "confidence", "uncertain")
THUMBNAIL = 96  # px, the side of the few reference frames a report shows


def frame_features(image: np.ndarray, size: int) -> dict[str, float]:
    """Statistics of an HxWx3 uint8 frame, seen at `size` x `size` px (OpenCV: a few ms at
    most, a served request pays it per frame)."""
    small = resize(image, size)
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255  # luma, BT.601
    mean, std = cv2.meanStdDev(gray)
    red, green, blue = (v / 255 for v in cv2.mean(small)[:3])
    saturation = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)[..., 1].mean() / 255  # (max - min) / max
    return {"brightness": float(mean[0, 0]), "contrast": float(std[0, 0]), "saturation": float(saturation),
            "red": float(red), "green": float(green), "blue": float(blue),
            "sharpness": float(cv2.Laplacian(gray, cv2.CV_32F).var()),
            "height": float(image.shape[0]), "width": float(image.shape[1])}


def prediction_features(prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Statistics of a calibrated probability map (HxW in [0, 1])."""
    return {"predicted_area": float((prob >= threshold).mean()),
            "confidence": float(np.maximum(prob, 1 - prob).mean()),
            "uncertain": float((np.abs(prob - 0.5) < 0.25).mean())}


def embedding_columns(n: int) -> list[str]:
    return [f"embedding_{i + 1}" for i in range(n)]


@dataclass
class Reference:
    """The profile of a model's training frames: one row per frame (`table`), the principal
    axes its embeddings are projected on (`mean`, `axes`), a few thumbnails to show."""

    table: pd.DataFrame
    mean: np.ndarray  # C
    axes: np.ndarray  # k x C
    thumbnails: np.ndarray  # T x THUMBNAIL x THUMBNAIL x 3 uint8
    source: str  # which frames, in words

    def project(self, embeddings: np.ndarray) -> pd.DataFrame:
        values = (embeddings - self.mean) @ self.axes.T if len(embeddings) else np.zeros((0, len(self.axes)))
        return pd.DataFrame(values, columns=embedding_columns(len(self.axes)))

    def to_payload(self) -> dict[str, Any]:
        """Tensors and plain values only: it travels in the model file (weights_only loads)."""
        import torch

        return {"columns": list(self.table.columns), "values": torch.tensor(self.table.to_numpy(np.float32)),
                "mean": torch.from_numpy(self.mean.astype(np.float32)), "axes": torch.from_numpy(self.axes.astype(np.float32)),
                "thumbnails": torch.from_numpy(self.thumbnails), "source": self.source}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], where: str) -> Reference:
        try:
            table = pd.DataFrame(payload["values"].numpy().astype(np.float64), columns=list(payload["columns"]))
            return cls(table, payload["mean"].numpy(), payload["axes"].numpy(), payload["thumbnails"].numpy(), str(payload["source"]))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"{where}: its reference profile is damaged ({exc}); train the model again") from None


def profile_frames(segmenter: Any, images: Sequence[np.ndarray], batch_size: int = 8) -> tuple[pd.DataFrame, np.ndarray]:
    """Frame and prediction statistics of each image (a DataFrame, one row each) and the
    model's embeddings (N x C), from one forward pass of `segmenter` (kdas.serving.Segmenter)."""
    logits, embeddings = segmenter.logits_with_embeddings(images, batch_size)
    rows = [{**frame_features(image, segmenter.image_size), **prediction_features(prepare(logit, "calibrated"))}
            for image, logit in zip(images, logits)]
    return pd.DataFrame(rows, columns=[*FRAME_FEATURES, *PREDICTION_FEATURES]), embeddings


def profile_files(segmenter: Any, paths: Iterable[Path], batch_size: int = 8, max_side: int | None = None,
                  progress: Any = None) -> tuple[pd.DataFrame, np.ndarray]:
    """`profile_frames` over image files, read a batch at a time (bounded memory)."""
    tables, embeddings, batch = [], [], []
    paths = list(paths)
    for i, path in enumerate(paths):
        batch.append(read_rgb(path, max_side))
        if len(batch) == batch_size or i == len(paths) - 1:
            table, emb = profile_frames(segmenter, batch, batch_size)
            tables.append(table)
            embeddings.append(emb)
            if progress is not None:
                progress.update(len(batch))
            batch = []
    if not tables:
        return pd.DataFrame(columns=[*FRAME_FEATURES, *PREDICTION_FEATURES]), np.zeros((0, 0), np.float32)
    return pd.concat(tables, ignore_index=True), np.concatenate(embeddings)


def build_reference(segmenter: Any, paths: Sequence[Path], *, components: int, thumbnails: int, source: str,
                    batch_size: int = 8) -> Reference:
    """The reference profile of `paths` (the model's training frames): their statistics and
    their embeddings on the first `components` principal axes."""
    table, embeddings = profile_files(segmenter, paths, batch_size)
    mean = embeddings.mean(axis=0)
    _, _, vt = np.linalg.svd(embeddings - mean, full_matrices=False)
    axes = vt[: min(components, len(vt))]
    reference = Reference(table, mean, axes, np.zeros((0, THUMBNAIL, THUMBNAIL, 3), np.uint8), source)
    reference.table = pd.concat([table, reference.project(embeddings)], axis=1)
    picked = np.linspace(0, len(paths) - 1, min(thumbnails, len(paths))).round().astype(int)
    reference.thumbnails = np.stack([resize(read_rgb(paths[i]), THUMBNAIL) for i in picked]) if len(picked) else reference.thumbnails
    return reference


def attach_reference(model_path: Path, frames: Sequence[Path], params: Any, device: Any) -> Reference:
    """Profile `params.frames` of `frames` (the model's training frames, drawn evenly) with
    the model of `model_path` and write the profile into that model file."""
    from kdas.checkpoint import load_model, save_model
    from kdas.serving.inference import Segmenter

    model_file = load_model(model_path, device)
    picked = [frames[i] for i in np.unique(np.linspace(0, len(frames) - 1, min(params.frames, len(frames))).round().astype(int))]
    reference = build_reference(Segmenter(model_file, device), picked, components=params.components, thumbnails=params.thumbnails,
                                source=f"{len(picked)} of its {len(frames)} training frames")
    save_model(model_path, model_file.model, image_size=model_file.image_size, info=model_file.info, reference=reference.to_payload())
    return reference
