"""Images in, maps out: the one inference path behind evaluate, predict and the served
MLflow model. The model sees each image resized to its training size; its logits
(P1 + P2) are upsampled back to the image's own size, in fp32, then prepared by
kdas.maps (``calibrated``: what a deployed model outputs, or ``published``: as the papers'
test scripts).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdas.checkpoint import ModelFile, load_model
from kdas.data.transforms import to_tensor
from kdas.device import select_device
from kdas.maps import prepare, resize


class Segmenter:
    def __init__(self, model_file: ModelFile, device: torch.device):
        self.model = model_file.model.to(device).eval()
        self.image_size = model_file.image_size
        self.info = model_file.info  # where the model came from (run, data), for the record
        self.reference = model_file.reference  # its training frames' profile (kdas.monitoring), if it carries one
        self.device = device

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> "Segmenter":
        dev = select_device(device)
        return cls(load_model(path, dev), dev)

    @torch.no_grad()
    def logits_with_embeddings(self, images: Sequence[np.ndarray], batch_size: int = 8) -> tuple[list[np.ndarray], np.ndarray]:
        """HxWx3 uint8 images -> HxW float32 logits of P1 + P2 at each image's size (fp32), and
        the encoder's embedding of each (its deepest stage, pooled: N x C; what drift monitoring
        compares, kdas.monitoring), from one forward pass."""
        out: list[np.ndarray] = []
        embeddings: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            x = torch.stack([to_tensor(resize(im, self.image_size)) for im in chunk]).to(self.device)
            features = self.model.encode(x)
            p1, p2 = self.model.decode(features, size=x.shape[-2:])
            embeddings.append(features[-1].float().mean(dim=(2, 3)).cpu().numpy())
            for im, logit in zip(chunk, (p1 + p2).float()):
                full = F.interpolate(logit[None], size=im.shape[:2], mode="bilinear", align_corners=False)
                out.append(full[0, 0].cpu().numpy())
        return out, np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32)

    def logits(self, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """HxWx3 uint8 images -> HxW float32 logits of P1 + P2 at each image's size (fp32)."""
        return self.logits_with_embeddings(images, batch_size)[0]

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 8, preparation: str = "calibrated") -> list[np.ndarray]:
        """HxWx3 uint8 images -> HxW float32 maps in [0, 1] (calibrated: probabilities)."""
        return [prepare(logit, preparation) for logit in self.logits(images, batch_size)]
