"""Images in, probability maps out: the one inference path behind evaluate, predict and
the served MLflow model. The map is sigmoid(P1 + P2) at the model's training size,
resized back to each image's own size (no min-max rescaling: an empty frame stays empty)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdas.checkpoint import ModelFile, load_model
from kdas.data.transforms import resize, to_tensor
from kdas.device import autocast, select_device


class Segmenter:
    def __init__(self, model_file: ModelFile, device: torch.device):
        self.model = model_file.model.to(device).eval()
        self.image_size = model_file.image_size
        self.device = device

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> "Segmenter":
        dev = select_device(device)
        return cls(load_model(path, dev), dev)

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """HxWx3 uint8 images -> HxW float32 foreground probabilities in [0, 1]."""
        out: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            x = torch.stack([to_tensor(resize(im, self.image_size)) for im in chunk]).to(self.device)
            with autocast(self.device):
                p1, p2 = self.model(x)
            probs = torch.sigmoid((p1 + p2).float())
            for im, prob in zip(chunk, probs):
                full = F.interpolate(prob[None], size=im.shape[:2], mode="bilinear", align_corners=False)
                out.append(full[0, 0].cpu().numpy())
        return out
