"""A timm-style registry: ``create_model("polyp_pvt_b2")``, ``create_model("polyp_pvt",
backbone="tf_efficientnet_lite0")``, ``list_models()``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kdas.io import unreachable

from .polyp_pvt import PolypPVT
from .weights import load_backbone_weights

log = logging.getLogger(__name__)

#: The general form: the Polyp-PVT decoder on any 4-stage timm backbone (``backbone=`` needed).
GENERIC = "polyp_pvt"

# name -> (default backbone, description)
_REGISTRY: dict[str, tuple[str, str]] = {
    "polyp_pvt_b2": ("pvt_v2_b2", "teacher: Polyp-PVT on PVTv2-B2 (25.1M params)"),
    "polyp_pvt_b0": ("pvt_v2_b0", "student: Polyp-PVT on PVTv2-B0 (3.65M params)"),
    # timm's test_convnext: 4 stages at strides 4-32, random init only; forward+backward of
    # a 2 x 64 x 64 batch in ~20 ms on CPU
    "polyp_pvt_tiny": ("test_convnext", "tests: Polyp-PVT on timm's tiny test_convnext (0.44M params)"),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model` (``polyp_pvt`` takes any ``backbone=``)."""
    return sorted([*_REGISTRY, GENERIC])


def resolve_backbone(name: str, backbone: str | None = None) -> str:
    """The timm backbone a model name (and optional explicit backbone) stands for."""
    if name == GENERIC:
        if not backbone:
            raise ValueError(f"model {GENERIC!r} needs a backbone, e.g. backbone='tf_efficientnet_lite0'")
        return backbone
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    default = _REGISTRY[name][0]
    if backbone and backbone != default:
        raise ValueError(f"model {name!r} is Polyp-PVT on {default}; for {backbone} use {GENERIC!r} with backbone={backbone!r}")
    return default


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the model hub: offline, timm's downloader retries for a minute."""
    return unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout) is None


def check_weights(weights: str, backbone: str) -> None:
    """Fail in seconds, before any data is read, when ``weights`` cannot be had."""
    hint = (f"pass a local file instead: model.<role>.weights: /path/to/{backbone}.safetensors (or .pth) in params.yaml, "
            "or weights: none for random init")
    if weights == "hub" and not _hub_reachable():
        raise RuntimeError(f"the ImageNet weights of {backbone} need the model hub, which this machine cannot reach; {hint}")
    if weights not in ("none", "hub") and not Path(weights).is_file():
        raise FileNotFoundError(f"backbone weights file not found: {weights}; {hint}")


def create_model(
    name: str,
    pretrained: str | os.PathLike | None = "none",
    *,
    backbone: str | None = None,
    **kwargs,
) -> PolypPVT:
    """Build a model.

    Args:
        name: one of :func:`list_models`; ``"polyp_pvt"`` with ``backbone=`` any 4-stage
            timm backbone (e.g. ``"tf_efficientnet_lite0"``).
        pretrained: ``"none"`` (random init), ``"hub"`` (timm downloads the backbone's
            ImageNet weights; needs network access) or the path of a local backbone
            checkpoint (``.pth``/``.pt``/``.safetensors``), loaded with
            :func:`~kdas.models.weights.load_backbone_weights` (the report is logged).
        **kwargs: passed to :class:`~kdas.models.polyp_pvt.PolypPVT` (``channel``,
            ``drop_path_rate``, ``mean``, ``std``).
    """
    backbone = resolve_backbone(name, backbone)
    pretrained = "none" if pretrained is None else os.fspath(pretrained)
    if pretrained == "none":
        return PolypPVT(backbone, **kwargs)
    if pretrained == "hub":
        check_weights("hub", backbone)
        try:
            return PolypPVT(backbone, hub_pretrained=True, **kwargs)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise RuntimeError(
                f"could not fetch the ImageNet weights of {backbone} from the model hub "
                f"({exc.__class__.__name__}: {reason}). Without network access, get the backbone "
                "checkpoint elsewhere and pass the local file instead: in params.yaml "
                f"model.<role>.weights: /path/to/{backbone}.safetensors (or .pth); in Python "
                f"pretrained='/path/to/{backbone}.safetensors'."
            ) from exc
    if not pretrained:
        raise ValueError("pretrained must be 'none', 'hub' or the path of a weights file, got ''")
    model = PolypPVT(backbone, **kwargs)
    report = load_backbone_weights(model, pretrained)
    log.info("%s on %s: %s", name, backbone, report)
    return model
