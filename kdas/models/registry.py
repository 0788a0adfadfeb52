"""A timm-style registry: ``create_model("polyp_pvt_b2")``, ``list_models()``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from torch import nn

from .polyp_pvt import PolypPVT
from .weights import load_backbone_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture: the Polyp-PVT decoder on a timm backbone."""

    backbone: str
    description: str

    def build(self, hub_pretrained: bool = False, **kwargs) -> nn.Module:
        return PolypPVT(self.backbone, hub_pretrained=hub_pretrained, **kwargs)


_REGISTRY: dict[str, ModelSpec] = {
    "polyp_pvt_b2": ModelSpec("pvt_v2_b2", "teacher: Polyp-PVT on PVTv2-B2 (25.1M params)"),
    "polyp_pvt_b0": ModelSpec("pvt_v2_b0", "student: Polyp-PVT on PVTv2-B0 (3.65M params)"),
    # timm's test_convnext: 4 stages at strides 4-32, random init only; forward+backward of
    # a 2 x 64 x 64 batch in ~20 ms on CPU
    "polyp_pvt_tiny": ModelSpec(
        "test_convnext", "tests: Polyp-PVT on timm's tiny test_convnext (0.44M params)"
    ),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def create_model(name: str, pretrained: str | os.PathLike | None = "none", **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models`.
        pretrained: ``"none"`` (random init), ``"hub"`` (timm downloads the backbone's
            ImageNet weights; needs network access) or the path of a local backbone
            checkpoint (``.pth``/``.pt``/``.safetensors``), loaded with
            :func:`~kdas.models.weights.load_backbone_weights` (the report is logged).
        **kwargs: passed to :class:`~kdas.models.polyp_pvt.PolypPVT` (``channel``,
            ``backbone_kwargs``).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    spec = _REGISTRY[name]
    pretrained = "none" if pretrained is None else os.fspath(pretrained)
    if pretrained == "none":
        return spec.build(**kwargs)
    if pretrained == "hub":
        try:
            return spec.build(hub_pretrained=True, **kwargs)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise RuntimeError(
                f"could not fetch the ImageNet weights of {spec.backbone} for {name} from the "
                f"model hub ({exc.__class__.__name__}: {reason}). Without network access, get "
                "the backbone checkpoint elsewhere and pass the local file instead: "
                f"pretrained='/path/to/{spec.backbone}.pth' (or .safetensors)."
            ) from exc
    if not pretrained:
        raise ValueError("pretrained must be 'none', 'hub' or the path of a weights file, got ''")
    model = spec.build(**kwargs)
    report = load_backbone_weights(model, pretrained)
    log.info("%s: %s", name, report)
    return model
