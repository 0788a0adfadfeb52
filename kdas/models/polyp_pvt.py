"""Polyp-PVT (Dong et al. 2021, arXiv 2108.06932) on any 4-stage timm backbone.

The decoder follows the official ``lib/pvt.py`` of DengPingFan/Polyp-PVT:

- CIM (camouflage identification module): channel attention then spatial attention on the
  stride-4 feature, reduced to ``channel`` maps and halved to stride 8;
- CFM (cascaded fusion module): the stride-8/16/32 features, each reduced to ``channel``
  maps by a 1x1 conv + BN ("translayer"), fused top-down into a stride-8 feature;
- SAM (similarity aggregation module): the CFM feature, guided by the CIM feature, is
  projected onto a 4x4 grid of graph nodes, mixed by a one-layer graph convolution and
  projected back (residually);
- two heads: P1 from the CFM feature and P2 from the SAM feature, both 1-channel logits
  upsampled from stride 8 to the input resolution.

The backbone is ``timm.create_model(name, features_only=True)``; its
``feature_info.channels()`` sizes the reductions, so the same decoder runs on PVTv2-B2
(teacher), PVTv2-B0 (student), EfficientNet-Lite or a tiny test backbone.

Faithful details worth knowing (they change neither the parameter count nor the MACs):
``BasicConv2d`` is conv + BN *without* the ReLU (the official module defines a ReLU and
never applies it), and SAM's guidance map is the softmax over the CIM feature's channels,
channel 1 taken (as in the official code). Models do no I/O beyond the optional hub
download of ``pretrained="hub"``; local weight files are read by
:func:`kdas.models.weights.load_backbone_weights`.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from kdas.stride import OUTPUT_STRIDE

#: Normalisation of backbones whose timm config names none.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EXPECTED_REDUCTIONS = [4, 8, 16, 32]


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm, no activation (the official ``BasicConv2d``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ChannelAttention(nn.Module):
    """CBAM channel attention: a shared 2-layer MLP over the avg- and max-pooled vectors."""

    def __init__(self, channels: int, ratio: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // ratio)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        mx = self.fc2(F.relu(self.fc1(F.adaptive_max_pool2d(x, 1))))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: a 7x7 conv over the channel-wise mean and max maps."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(stats))


class CIM(nn.Module):
    """Camouflage identification module: channel then spatial attention (stride 4)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.ca = ChannelAttention(channels)
        self.sa = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ca(x) * x
        return self.sa(x) * x


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class CFM(nn.Module):
    """Cascaded fusion module over the reduced stride-32, -16 and -8 features."""

    def __init__(self, channel: int) -> None:
        super().__init__()
        c = channel
        self.conv_up1 = ConvBN(c, c, 3)
        self.conv_up2 = ConvBN(c, c, 3)
        self.conv_up3 = ConvBN(c, c, 3)
        self.conv_up4 = ConvBN(c, c, 3)
        self.conv_up5 = ConvBN(2 * c, 2 * c, 3)
        self.conv_concat2 = ConvBN(2 * c, 2 * c, 3)
        self.conv_concat3 = ConvBN(3 * c, 3 * c, 3)
        self.conv_out = ConvBN(3 * c, c, 3)

    def forward(self, f32: torch.Tensor, f16: torch.Tensor, f8: torch.Tensor) -> torch.Tensor:
        up_f32 = _up2(f32)
        x16 = self.conv_up1(up_f32) * f16
        x8 = self.conv_up2(_up2(up_f32)) * self.conv_up3(_up2(f16)) * f8
        x16 = self.conv_concat2(torch.cat([x16, self.conv_up4(up_f32)], dim=1))
        x8 = self.conv_concat3(torch.cat([x8, self.conv_up5(_up2(x16))], dim=1))
        return self.conv_out(x8)


class GCN(nn.Module):
    """One graph convolution: mixing over nodes (with a residual difference), then states."""

    def __init__(self, num_state: int, num_node: int) -> None:
        super().__init__()
        self.node_conv = nn.Conv1d(num_node, num_node, kernel_size=1)
        self.state_conv = nn.Conv1d(num_state, num_state, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B x state x node
        h = self.node_conv(x.transpose(1, 2)).transpose(1, 2)
        return F.relu(self.state_conv(h - x))


class SAM(nn.Module):
    """Similarity aggregation module (a GloRe-style graph reasoning unit).

    ``x`` (the CFM feature) is projected onto ``mids * mids`` anchor nodes: the anchors are
    the CIM-guided projection average-pooled to a (mids + 2)^2 grid with the border cells
    dropped; pixel-to-anchor similarities (softmax over the anchors) aggregate the state
    features into node states, a GCN mixes them, and they are scattered back to the pixels.
    """

    def __init__(self, num_in: int = 32, plane_mid: int = 16, mids: int = 4) -> None:
        super().__init__()
        self.num_s = plane_mid
        self.mids = mids
        self.conv_state = nn.Conv2d(num_in, plane_mid, kernel_size=1)
        self.conv_proj = nn.Conv2d(num_in, plane_mid, kernel_size=1)
        self.gcn = GCN(num_state=plane_mid, num_node=mids * mids)
        self.conv_extend = nn.Conv2d(plane_mid, num_in, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if guide.shape[-2:] != x.shape[-2:]:
            guide = F.interpolate(guide, size=(h, w), mode="nearest")
        # As in the official code: softmax over the guide's channels, channel 1 kept.
        guide = torch.softmax(guide, dim=1)[:, 1:2]

        state = self.conv_state(x).reshape(n, self.num_s, -1)  # B x S x HW
        proj = self.conv_proj(x)  # B x S x H x W
        anchors = F.adaptive_avg_pool2d(proj * guide, self.mids + 2)[:, :, 1:-1, 1:-1]
        anchors = anchors.reshape(n, self.num_s, -1)  # B x S x K
        affinity = anchors.transpose(1, 2) @ proj.reshape(n, self.num_s, -1)  # B x K x HW
        sim = torch.softmax(affinity, dim=1)
        nodes = self.gcn(state @ sim.transpose(1, 2))  # B x S x K
        out = (nodes @ sim).reshape(n, self.num_s, h, w)
        return x + self.conv_extend(out)


def _nearest_multiples(size: int, multiple: int = OUTPUT_STRIDE) -> list[int]:
    lo = (size // multiple) * multiple
    hi = lo + multiple
    return [s for s in (lo, hi) if s > 0]


def check_input_size(height: int, width: int, multiple: int = OUTPUT_STRIDE) -> None:
    """Raise ValueError unless both sides are positive multiples of ``multiple``."""
    if height % multiple == 0 and width % multiple == 0 and height > 0 and width > 0:
        return
    raise ValueError(
        f"input size {height}x{width} does not fit the output stride {multiple}: height and "
        f"width must be multiples of {multiple} (nearest valid height: "
        f"{' or '.join(map(str, _nearest_multiples(height, multiple)))}; nearest valid width: "
        f"{' or '.join(map(str, _nearest_multiples(width, multiple)))})"
    )


class PolypPVT(nn.Module):
    """Polyp-PVT decoder over a 4-stage timm backbone; ``forward(x) -> (P1, P2)`` logits.

    The model takes RGB images scaled to [0, 1] and normalises them itself with its
    backbone's mean/std (timm's pretrained config for that backbone, as ``pretrained_cfg``
    does): teacher and student may expect different normalisations (PVTv2: ImageNet
    constants; EfficientNet-Lite: 0.5/0.5), and an exported graph carries it.

    Args:
        backbone: a timm model name with 4 feature stages at strides 4/8/16/32.
        channel: width of the decoder (32 in the paper).
        hub_pretrained: let timm download ImageNet weights (needs network access).
        drop_path_rate: the backbone's stochastic depth (0.1 in the official Polyp-PVT).
        mean, std: input normalisation; default: timm's config for ``backbone``.
    """

    def __init__(
        self,
        backbone: str,
        channel: int = 32,
        hub_pretrained: bool = False,
        drop_path_rate: float = 0.0,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.channel = channel
        kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        self.backbone = timm.create_model(backbone, features_only=True, pretrained=hub_pretrained, **kwargs)
        cfg = timm.get_pretrained_cfg(backbone)
        self.mean = tuple(float(v) for v in (mean or getattr(cfg, "mean", None) or IMAGENET_MEAN))
        self.std = tuple(float(v) for v in (std or getattr(cfg, "std", None) or IMAGENET_STD))
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        channels = list(self.backbone.feature_info.channels())
        reductions = list(self.backbone.feature_info.reduction())
        if reductions[-4:] != _EXPECTED_REDUCTIONS:
            raise ValueError(
                f"backbone {backbone!r} has feature strides {reductions}; Polyp-PVT needs its last 4 "
                f"stages at strides {_EXPECTED_REDUCTIONS}"
            )
        # e.g. EfficientNet's stride-2 stage first: the decoder reads the last four
        self._feature_slice = slice(len(reductions) - 4, len(reductions))
        c1, c2, c3, c4 = channels[-4:]

        self.cim = CIM(c1)
        self.reduce1 = ConvBN(c1, channel, 1)
        self.reduce2 = ConvBN(c2, channel, 1)
        self.reduce3 = ConvBN(c3, channel, 1)
        self.reduce4 = ConvBN(c4, channel, 1)
        self.cfm = CFM(channel)
        self.sam = SAM(num_in=channel)
        self.head_cfm = nn.Conv2d(channel, 1, 1)
        self.head_sam = nn.Conv2d(channel, 1, 1)

    def config(self) -> dict:
        """What rebuilds this model without params.yaml (saved in every model file)."""
        return {"arch": "polyp_pvt", "backbone": self.backbone_name, "channel": self.channel,
                "mean": list(self.mean), "std": list(self.std)}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(self.encode(x), size=x.shape[-2:])

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's last four stages (strides 4 to 32) of a B x 3 x H x W batch in [0, 1]."""
        if x.ndim != 4:
            raise ValueError(f"expected a B x C x H x W batch, got shape {tuple(x.shape)}")
        check_input_size(*x.shape[-2:])
        return self.backbone((x - self._mean) / self._std)[self._feature_slice]

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(P1, P2) logits at `size` from `encode`'s features."""
        f4, f8, f16, f32 = features
        cim = self.cim(f4)
        cfm = self.cfm(self.reduce4(f32), self.reduce3(f16), self.reduce2(f8))
        guide = F.interpolate(
            self.reduce1(cim), size=cfm.shape[-2:], mode="bilinear", align_corners=True
        )
        sam = self.sam(cfm, guide)

        p1 = F.interpolate(self.head_cfm(cfm), size=tuple(size), mode="bilinear")
        p2 = F.interpolate(self.head_sam(sam), size=tuple(size), mode="bilinear")
        return p1, p2
