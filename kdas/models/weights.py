"""Loading ImageNet backbone weights from a local file (no model hub needed).

Accepted files: ``.pth`` / ``.pt`` / ``.bin`` (read with ``torch.load(weights_only=True)``)
or ``.safetensors``, holding a backbone state_dict either at the top level or nested under
``"state_dict"`` or ``"model"``. Three key layouts load:

- timm's (``stages.0.blocks.0...``, e.g. a timm ``pvt_v2_b2`` ImageNet checkpoint; its
  classification head is reported as unexpected),
- timm's ``features_only`` layout (``stages_0.blocks.0...``, e.g. ``model.backbone.state_dict()``),
- the original release of the architecture when timm knows how to convert it (timm's
  ``checkpoint_filter_fn``; e.g. whai362's ``pvt_v2_b2.pth``, which the official Polyp-PVT
  code loads), with a ``module.`` / ``backbone.`` / ``model.`` prefix stripped if present.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

_PREFIXES = ("module.", "backbone.", "model.", "encoder.")


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did: backbone keys left at their initial values
    (``missing``) and file keys not used (``unexpected``)."""

    path: Path
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"loaded {self.loaded} backbone tensors from {self.path}; "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"
        ]
        sections = (("missing (left at init)", self.missing), ("unexpected (ignored)", self.unexpected))
        for title, keys in sections:
            if keys:
                more = f", ... ({len(keys) - 10} more)" if len(keys) > 10 else ""
                shown = ", ".join(keys[:10]) + more
                lines.append(f"  {title}: {shown}")
        return "\n".join(lines)


def _read_file(path: Path) -> Mapping[str, object]:
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with arbitrary objects, wrong format
        raise ValueError(
            f"could not read backbone weights from {path}: {exc.__class__.__name__}: {exc} "
            "(expected a state_dict saved with torch.save or safetensors)"
        ) from exc


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping):
        nested = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state_dict (found {type(obj).__name__})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    return tensors


def _timm_filter(state_dict: dict[str, torch.Tensor], arch: str | None) -> dict[str, torch.Tensor]:
    """Convert an original-release checkpoint to timm's layout where timm knows how."""
    if not arch:
        return state_dict
    try:
        import timm

        module = importlib.import_module(timm.models.model_entrypoint(arch).__module__)
        filter_fn = getattr(module, "checkpoint_filter_fn", None)
        if filter_fn is None:
            return state_dict
        converted = filter_fn(dict(state_dict), None)
    except Exception:  # a filter that needs the full model, or none registered: keep as is
        log.debug("timm checkpoint_filter_fn for %s not applied", arch, exc_info=True)
        return state_dict
    return {k: v for k, v in converted.items() if isinstance(v, torch.Tensor)}


def _canonical(key: str) -> str:
    # features_only backbones flatten "stages.0" into "stages_0": compare modulo . and _
    return key.replace(".", "_")


def _match(
    own_keys: list[str], state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    own_exact = set(own_keys)
    own_canon = {_canonical(k): k for k in own_keys}
    matched: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        target = key if key in own_exact else own_canon.get(_canonical(key))
        if target is None or target in matched:
            unexpected.append(key)
        else:
            matched[target] = value
    return matched, unexpected


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict file (``.pth``/``.pt``/``.safetensors``), read safely."""
    path = Path(path)
    return _unwrap(_read_file(path), path)


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a backbone checkpoint into ``model.backbone`` (or ``model`` if it has none).

    Returns a :class:`LoadReport`. Raises FileNotFoundError if the file does not exist,
    ValueError if it cannot be read, matches no backbone tensor, or has tensors of the
    wrong shape (a checkpoint of another backbone size).
    """
    return load_backbone_state(model, read_state_dict(path), Path(path))


def load_backbone_state(model: nn.Module, raw: dict[str, torch.Tensor], path: Path) -> LoadReport:
    """:func:`load_backbone_weights` on tensors already read from ``path``."""
    backbone = getattr(model, "backbone", model)
    arch = getattr(model, "backbone_name", None)

    own = backbone.state_dict()
    own_keys = list(own)
    # Readings of the file: as is, and without a common prefix (keys outside the prefix are
    # then unexpected), each also through timm's converter; the one matching most wins.
    readings: list[tuple[dict[str, torch.Tensor], list[str]]] = [(raw, [])]
    for prefix in _PREFIXES:
        inside = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        if inside:
            readings.append((inside, [k for k in raw if not k.startswith(prefix)]))
    readings += [(_timm_filter(sd, arch), outside) for sd, outside in readings]
    scored = [(_match(own_keys, sd), outside) for sd, outside in readings]
    (matched, unexpected), outside = max(scored, key=lambda item: len(item[0][0]))
    unexpected = unexpected + outside

    if not matched:
        raise ValueError(
            f"no tensor in {path} matches the backbone {arch or type(backbone).__name__} "
            f"(file keys look like {list(raw)[:3]}, backbone keys like {own_keys[:3]})"
        )
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in matched.items()
        if v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(
            f"{path} does not fit the backbone {arch or type(backbone).__name__} "
            f"({len(wrong)} tensors of the wrong shape, e.g. {'; '.join(wrong[:3])}): "
            "is it a checkpoint of another model size?"
        )
    result = backbone.load_state_dict(matched, strict=False)
    return LoadReport(
        path=path,
        loaded=len(matched),
        missing=sorted(result.missing_keys),
        unexpected=sorted(unexpected),
    )
