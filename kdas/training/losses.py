"""The ground truth's loss, shared by every method: pure torch functions, no state, no I/O.

Prediction maps are B x 1 x H x W *logits* (the models' P1 and P2), masks B x 1 x H x W in
[0, 1]. Every function computes in float32 whatever the input dtype (autocast-safe). The
teacher's terms live with their methods (kdas/training/methods/<name>.py); the helpers here
(shape checks, pooling, the boundary weight) are theirs too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_map(name: str, x: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{name} must be a B x 1 x H x W map, got shape {tuple(x.shape)}")


def check_pair(student: Tensor, teacher: Tensor) -> None:
    check_map("student_logits", student)
    check_map("teacher_logits", teacher)
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher maps differ in shape: {tuple(student.shape)} vs {tuple(teacher.shape)}"
        )


def pool(x: Tensor, pool_stride: int) -> Tensor:
    if pool_stride < 1:
        raise ValueError(f"pool_stride must be >= 1, got {pool_stride}")
    if pool_stride == 1:
        return x
    if x.shape[-2] < pool_stride or x.shape[-1] < pool_stride:
        raise ValueError(
            f"pool_stride {pool_stride} is larger than the map ({x.shape[-2]}x{x.shape[-1]})"
        )
    return F.avg_pool2d(x, kernel_size=pool_stride, stride=pool_stride)


def box_mean(x: Tensor, radius: int) -> Tensor:
    """``F.avg_pool2d(x, 2 * radius + 1, 1, radius)`` (zero padding counted), by a summed-area
    table. PyTorch's CPU avg_pool2d loops over every window term (961 per pixel at radius 15:
    181 ms for 8 x 224 x 224); two cumulative sums cost the same whatever the radius. The
    table is float64 so that large sums keep their fractional part (exact to ~1e-12)."""
    k = 2 * radius + 1
    table = F.pad(x.double(), (radius + 1, radius, radius + 1, radius)).cumsum(-1).cumsum(-2)
    window = table[..., k:, k:] - table[..., :-k, k:] - table[..., k:, :-k] + table[..., :-k, :-k]
    return (window / k**2).to(x.dtype)


def boundary_weight(mask: Tensor) -> Tensor:
    """PraNet's pixel weight ``1 + 5 * |avgpool31(mask) - mask|``: large near mask boundaries.
    It depends on the mask alone, so a step computes it once for P1 and P2."""
    mask = mask.float()
    return 1 + 5 * torch.abs(box_mean(mask, 15) - mask)


def structure_loss(logits: Tensor, mask: Tensor, weight: Tensor | None = None, weighted_bce: bool = True) -> Tensor:
    """PraNet / Polyp-PVT structure loss: boundary-weighted BCE + weighted IoU, batch mean.

    ``weight`` is :func:`boundary_weight` of ``mask`` (computed here when not given). The
    official code's legacy ``reduce='none'`` argument makes its BCE an already-averaged
    scalar, so the weights are lost there; ``weighted_bce=False`` reproduces that (a plain
    mean BCE), the default applies them per pixel.
    """
    check_map("logits", logits)
    if mask.shape != logits.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from logits {tuple(logits.shape)}")
    logits = logits.float()
    mask = mask.float()
    if weight is None:
        weight = boundary_weight(mask)
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    wbce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3)) if weighted_bce else bce.mean(dim=(2, 3))

    prob = torch.sigmoid(logits)
    inter = (prob * mask * weight).sum(dim=(2, 3))
    union = ((prob + mask) * weight).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


def structure_term(student_out: tuple[Tensor, Tensor], mask: Tensor, weight: Tensor, *, weighted_bce: bool) -> Tensor:
    """``S = structure(P1) + structure(P2)``, the ground truth's term of every method.
    ``weight`` is :func:`boundary_weight` of ``mask``: it depends on the mask alone, so a step
    computes it once for P1, P2 and any teacher term weighted like the structure loss."""
    s1, s2 = student_out
    return structure_loss(s1, mask, weight, weighted_bce) + structure_loss(s2, mask, weight, weighted_bce)
