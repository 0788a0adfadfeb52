"""The published teacher: the official Polyp-PVT release (DengPingFan/Polyp-PVT,
``PolypPVT.pth``: a state_dict of its ``lib/pvt.py`` module) loaded into our Polyp-PVT.

Its decoder's key names map one to one onto ours (below); its backbone is whai362's
PVTv2 layout, converted by timm's own ``checkpoint_filter_fn`` (see weights.py). Every
tensor must find its place and none may be left over: a partial import would distil from
a half-random teacher.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .polyp_pvt import PolypPVT
from .registry import create_model
from .weights import load_backbone_state, read_state_dict

# official decoder key prefix -> ours
DECODER_KEYS = {
    "Translayer2_0.": "reduce1.",
    "Translayer2_1.": "reduce2.",
    "Translayer3_1.": "reduce3.",
    "Translayer4_1.": "reduce4.",
    "CFM.conv_upsample": "cfm.conv_up",
    "CFM.conv_concat": "cfm.conv_concat",
    "CFM.conv4.": "cfm.conv_out.",
    "ca.": "cim.ca.",
    "sa.conv1.": "cim.sa.conv.",
    "SAM.gcn.conv1.": "sam.gcn.node_conv.",
    "SAM.gcn.conv2.": "sam.gcn.state_conv.",
    "SAM.": "sam.",
    "out_CFM.": "head_cfm.",
    "out_SAM.": "head_sam.",
}


def _decoder_key(key: str) -> str | None:
    for official, ours in DECODER_KEYS.items():
        if key.startswith(official):
            return ours + key[len(official):]
    return None


def load_official_checkpoint(path: str | os.PathLike, backbone: str = "pvt_v2_b2") -> PolypPVT:
    """Our Polyp-PVT on ``backbone`` with the weights of an official checkpoint."""
    path = Path(path)
    raw = {re.sub(r"^module\.", "", k): v for k, v in read_state_dict(path).items()}
    model = create_model("polyp_pvt", backbone=backbone)
    in_backbone = {k[len("backbone."):]: v for k, v in raw.items() if k.startswith("backbone.")}
    if not in_backbone:
        raise ValueError(f"{path}: no 'backbone.*' tensors: not an official Polyp-PVT checkpoint")
    report = load_backbone_state(model, in_backbone, path)
    if report.missing or report.unexpected:
        raise ValueError(f"{path}: its backbone does not fit {backbone} exactly ({report}); pass --backbone")

    decoder, unknown = {}, []
    for key, value in raw.items():
        if key.startswith("backbone."):
            continue
        ours = _decoder_key(key)
        if ours is None:
            unknown.append(key)
        else:
            decoder[ours] = value
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    missing = sorted(set(own) - set(decoder))
    unknown += sorted(set(decoder) - set(own))
    if missing or unknown:
        raise ValueError(f"{path}: not the official Polyp-PVT decoder (missing: {missing[:5]}, unknown: {unknown[:5]})")
    wrong = [k for k, v in decoder.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{path}: decoder tensors of the wrong shape for {backbone} (e.g. {wrong[:3]}); pass --backbone")
    with torch.no_grad():
        model.load_state_dict(decoder, strict=False)
    return model.eval()
