"""What a training step optimises, as `timm.task` frames distillation: a task owns the
frozen teacher (if its method needs one) and the loss, and returns the loss components;
the engine stays ignorant of the method."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from kdas.config import DistillParams
from kdas.losses import distillation_loss


class SegmentationTask:
    """Ground-truth training (`distill.method` none) or distillation from `teacher`.

    The forward passes run under `precision` (the engine's autocast); the losses run
    outside it, in fp32: their boundary weights, sums over 100k pixels and the teacher's
    P P^T matmuls lose too much in bf16. `compile` hands the loss to torch.compile."""

    def __init__(self, distill: DistillParams | None, weighted_bce: bool, teacher: nn.Module | None = None,
                 precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, compile: bool = False):
        """`distill` None: the ground truth alone (as method "none")."""
        if distill is not None and distill.method != "none" and teacher is None:
            raise ValueError(f"distill.method '{distill.method}' needs a teacher: pass --teacher MODEL_FILE_OR_URI")
        self.distill = distill if distill is not None and distill.method != "none" else None
        self.weighted_bce = weighted_bce
        self.precision = precision
        # the teacher is frozen: eval mode (BN statistics, no dropout), no gradients
        self.teacher = teacher.requires_grad_(False).eval() if self.distill is not None else None
        self.loss = torch.compile(distillation_loss) if compile else distillation_loss

    def _teacher_maps(self, images: Tensor, size: torch.Size) -> tuple[Tensor, ...]:
        """The teacher's maps of `images`, at the student's map `size` (a teacher may see the frames larger)."""
        with record_function("teacher"), torch.inference_mode():
            maps = self.teacher(images)
            if maps[0].shape[-2:] != size:
                maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
        return tuple(m.clone() for m in maps)  # inference tensors cannot be saved for backward

    def __call__(self, net: nn.Module, images: Tensor, masks: Tensor, teacher_images: Tensor | None = None) -> dict[str, Tensor]:
        """`teacher_images`: the same frames at the teacher's size, where it differs from the student's."""
        with self.precision():
            with record_function("forward"):
                student = net(images)
            if self.teacher is not None:
                teacher = self._teacher_maps(images if teacher_images is None else teacher_images, student[0].shape[-2:])
            else:
                teacher = None
        d = self.distill
        with record_function("loss"):
            if d is None:
                return self.loss("none", student, None, masks, alpha=0.0, tau=1.0, pool_stride=1, attention="spatial",
                                 weighted_bce=self.weighted_bce)  # method none: only the structure loss, the rest unused
            return self.loss(d.method, student, teacher, masks, alpha=d.alpha, tau=d.tau, pool_stride=d.pool_stride,
                             attention=d.attention, weighted_bce=self.weighted_bce)
