"""What a training step optimises, as `timm.task` frames distillation: a task owns the
frozen teacher (if its method needs one) and the loss, and returns the loss components;
the engine stays ignorant of the method."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdas.config import DistillParams
from kdas.losses import distillation_loss


class SegmentationTask:
    """Ground-truth training (`distill.method` none) or distillation from `teacher`."""

    def __init__(self, distill: DistillParams | None, weighted_bce: bool, teacher: nn.Module | None = None):
        """`distill` None: the ground truth alone (as method "none")."""
        if distill is not None and distill.method != "none" and teacher is None:
            raise ValueError(f"distill.method '{distill.method}' needs a teacher: pass --teacher MODEL_FILE_OR_URI")
        self.distill = distill if distill is not None and distill.method != "none" else None
        self.weighted_bce = weighted_bce
        # the teacher is frozen: eval mode (BN statistics, no dropout), no gradients
        self.teacher = teacher.requires_grad_(False).eval() if self.distill is not None else None

    def __call__(self, net: nn.Module, images: Tensor, masks: Tensor) -> dict[str, Tensor]:
        student = net(images)
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(images)
        d = self.distill
        if d is None:
            return distillation_loss("none", student, None, masks, alpha=0.0, tau=1.0, pool_stride=1, attention="spatial",
                                     weighted_bce=self.weighted_bce)  # method none: only the structure loss, the rest unused
        return distillation_loss(d.method, student, teacher, masks, alpha=d.alpha, tau=d.tau, pool_stride=d.pool_stride,
                                 attention=d.attention, weighted_bce=self.weighted_bce)
