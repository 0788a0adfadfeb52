"""Model files: the weights plus what it takes to rebuild and feed the model.

A model file holds only tensors and plain values, so it loads with
`torch.load(weights_only=True)`: no pickled code runs on load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdas.io import atomic_path
from kdas.models import create_model

FORMAT = "kdas-model/1"


@dataclass
class ModelFile:
    model: nn.Module
    arch: str
    image_size: int
    info: dict[str, Any] = field(default_factory=dict)


def save_model(path: str | Path, model: nn.Module, *, arch: str, image_size: int, info: dict[str, Any] | None = None) -> Path:
    """Write a model file atomically. `info` holds plain values (metrics, epoch, run id...)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    payload = {
        "format": FORMAT,
        "arch": arch,
        "image_size": int(image_size),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "info": info or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> ModelFile:
    """Rebuild a model from a model file, in eval mode on `device`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file (train one with `kdas train ...`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise ValueError(f"{path}: not a loadable model file ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a kdas model file (expected format {FORMAT})")
    model = create_model(payload["arch"])
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    return ModelFile(model=model, arch=payload["arch"], image_size=payload["image_size"], info=payload["info"])
