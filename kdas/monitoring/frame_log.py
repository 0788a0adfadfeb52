"""The frames a served model saw, as `kdas monitor` reads them: one JSON line per frame in
FOLDER/frames.jsonl (its time, the frame's and the prediction's statistics, the embedding
on the reference's axes where the model runs on torch), and the frames themselves as JPEG
only when asked, up to a size cap.

Off by default; the served model turns it on from its environment:
    KDAS_SERVED_LOG=/srv/kdas/served          the folder (made if missing)
    KDAS_SERVED_LOG_IMAGES_MB=200             also keep the frames, at most this many MB
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from kdas.monitoring.profile import Reference, frame_features, prediction_features

SERVED_LOG = "frames.jsonl"
FOLDER_ENV = "KDAS_SERVED_LOG"
IMAGES_ENV = "KDAS_SERVED_LOG_IMAGES_MB"


class FrameLog:
    def __init__(self, folder: Path, size: int, threshold: float, reference: Reference | None = None, image_budget: int = 0):
        self.folder, self.size, self.threshold, self.reference = folder, size, threshold, reference
        self.folder.mkdir(parents=True, exist_ok=True)
        self.image_budget = image_budget  # bytes of frames this process may still keep
        self.lock = threading.Lock()  # the scoring server may answer requests in threads

    @classmethod
    def from_environ(cls, size: int, threshold: float, reference: Reference | None) -> FrameLog | None:
        folder = os.environ.get(FOLDER_ENV)
        if not folder:
            return None
        try:
            megabytes = float(os.environ.get(IMAGES_ENV) or 0)
        except ValueError:
            raise ValueError(f"{IMAGES_ENV}={os.environ[IMAGES_ENV]!r}: not a number of megabytes") from None
        return cls(Path(folder), size, threshold, reference, image_budget=int(max(megabytes, 0) * 2**20))

    def record(self, images: list[np.ndarray], probs: list[np.ndarray], embeddings: np.ndarray | None) -> None:
        """Append one line per frame (and keep the frames while the budget lasts)."""
        now = time.time()
        projected = self.reference.project(embeddings).to_dict("records") if embeddings is not None and self.reference else None
        lines = []
        for i, (image, prob) in enumerate(zip(images, probs)):
            row = {"time": now, **frame_features(image, self.size), **prediction_features(prob, self.threshold),
                   **(projected[i] if projected else {})}
            if self.image_budget > 0:
                row["frame"] = self._keep(image, f"frame-{time.time_ns()}-{i}.jpg")
            lines.append(json.dumps(row) + "\n")
        with self.lock, open(self.folder / SERVED_LOG, "a", encoding="utf-8") as fh:
            fh.write("".join(lines))  # one write per request, appended: server processes add whole lines

    def _keep(self, image: np.ndarray, name: str) -> str | None:
        from PIL import Image

        path = self.folder / name
        Image.fromarray(image).save(path, format="JPEG", quality=90)
        with self.lock:
            self.image_budget -= path.stat().st_size
        return name
