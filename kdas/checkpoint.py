"""Model files: the weights plus everything it takes to rebuild and feed the model.

A model file describes itself (as timm's ``pretrained_cfg`` does): architecture, backbone,
decoder width, input normalisation and the training image size travel with the weights,
so evaluate, predict, serve and export rebuild it without params.yaml. It holds only
tensors and plain values, so it loads with `torch.load(weights_only=True)`: no pickled
code runs on load.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from kdas.config import check_image_size
from kdas.io import atomic_path
from kdas.models import PolypPVT, create_model

FORMAT = "kdas-model/2"
_CONFIG_KEYS = ("arch", "backbone", "channel", "mean", "std")


@dataclass
class ModelFile:
    model: PolypPVT
    image_size: int
    info: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] | None = None  # the training frames' profile (kdas.monitoring.Reference's payload)

    @property
    def config(self) -> dict[str, Any]:
        return self.model.config()


def save_model(path: str | Path, model: nn.Module, *, image_size: int, info: dict[str, Any] | None = None,
               reference: dict[str, Any] | None = None) -> Path:
    """Write a model file atomically. `info` holds plain values (metrics, epoch, run id...),
    `reference` the profile of the training frames (tensors and plain values)."""
    check_image_size(image_size, f"{path}: image_size")  # never a file that no reader can use
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    payload = {
        "format": FORMAT,
        "model": model.config(),
        "image_size": int(image_size),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "info": info or {},
        **({"reference": reference} if reference is not None else {}),
    }
    save_torch(payload, path)
    return Path(path)


def save_torch(obj: Any, path: str | Path) -> None:
    """torch.save, atomically, and a full disk is an OSError ENOSPC naming the file (torch's
    own writer says only "file write failed"): serialised in memory, then written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        try:
            tmp.write_bytes(buffer.getbuffer())
        except OSError as exc:  # a failed write() names no file
            raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None


def build_from_config(config: dict[str, Any], state: dict[str, Any], where: Path) -> PolypPVT:
    """A random-init model of the architecture a model file records, once its shapes are
    known to fit the file's own weights. The check builds it on the meta device (no memory),
    so a file that declares a huge `channel` or backbone is refused before any allocation;
    and only timm's own backbone names are taken (an ``hf-hub:`` name would contact the hub)."""
    if not isinstance(config["backbone"], str) or not timm.is_model(config["backbone"]):
        raise ValueError(f"{where}: backbone {config['backbone']!r} is not one of timm's model names")
    mean, std = config["mean"], config["std"]
    if not all(isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v) for v in (mean, std)) \
            or min(std) <= 0:
        raise ValueError(f"{where}: its normalisation (mean {mean!r}, std {std!r}) is not three finite numbers each, std > 0: "
                         "every map would be NaN")
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in _create(config).state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as exc:  # a declared value that does not build
        raise ValueError(f"{where}: its architecture does not build ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    given = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    if shapes != given:
        differ = sorted(set(shapes) ^ set(given)) or sorted(k for k in shapes if shapes[k] != given[k])
        raise ValueError(f"{where}: its weights do not fit its own architecture ({len(differ)} tensor(s) differ, e.g. {differ[0]})")
    return _create(config)


def _create(config: dict[str, Any]) -> PolypPVT:
    return create_model(config["arch"], backbone=config["backbone"], channel=config["channel"],
                        mean=tuple(config["mean"]), std=tuple(config["std"]))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> ModelFile:
    """Rebuild a model from a model file, in eval mode on `device`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file (train one with `kdas train ...`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise ValueError(f"{path}: not a loadable model file ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: not a kdas model file (expected format {FORMAT}, found {found!r}); "
                         "train one with `kdas train`, or import an official Polyp-PVT checkpoint with `kdas import-teacher`")
    config, state = payload.get("model"), payload.get("state_dict")
    if not isinstance(config, dict) or any(k not in config for k in _CONFIG_KEYS) or not isinstance(state, dict):
        raise ValueError(f"{path}: a damaged kdas model file (needs 'model' with {', '.join(_CONFIG_KEYS)} and 'state_dict')")
    check_image_size(payload.get("image_size"), f"{path}: image_size")
    model = build_from_config(config, state, path)
    model.load_state_dict(state)
    model.to(device).eval()
    reference = payload.get("reference")
    return ModelFile(model=model, image_size=payload["image_size"], info=payload.get("info") or {},
                     reference=reference if isinstance(reference, dict) else None)
