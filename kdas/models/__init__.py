"""Segmentation models: Polyp-PVT over timm backbones, a small registry, weight loading.

>>> model = create_model("polyp_pvt_b0")            # random init
>>> model = create_model("polyp_pvt_b2", pretrained="weights/pvt_v2_b2.pth")
>>> model = create_model("polyp_pvt", backbone="tf_efficientnet_lite0", pretrained="hub")
>>> p1, p2 = model(images)      # RGB in [0, 1], B x 3 x H x W -> logits at the input's size
"""

from .complexity import count_macs, count_parameters
from .polyp_pvt import OUTPUT_STRIDE, PolypPVT, check_input_size
from .registry import GENERIC, create_model, list_models, resolve_backbone
from .weights import LoadReport, load_backbone_weights

__all__ = [
    "GENERIC",
    "OUTPUT_STRIDE",
    "LoadReport",
    "PolypPVT",
    "check_input_size",
    "count_macs",
    "count_parameters",
    "create_model",
    "list_models",
    "load_backbone_weights",
    "resolve_backbone",
]
