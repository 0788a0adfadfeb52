"""What a training step optimises, as `timm.task` frames distillation: a method is a type.

Each method is one module of kdas/training/methods/ (its params, its task, its teacher
terms); `kdas.training.methods.create_task` builds the task that `distill.method` names. A
task runs the forward passes and returns its loss components; the engine calls every task
the same way and never asks which method it runs.

Every method that distils trains ``loss = S + weight * (its teacher terms)``: the ground
truth at full weight (S, :func:`kdas.training.losses.structure_term`), as the
segmentation-distillation methods that report gains do (SKD, CWD, DIST), so that at weight
0 the loss is exactly S. The official KDAS code's convex form ``(1 - alpha) S + alpha K``
trains as ``S + alpha / (1 - alpha) K`` (AdamW is invariant to the scale of the whole loss):
its alpha 0.3 is weight 0.43 here (the `paper` profile).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from kdas.checkpoint import ModelFile
from kdas.config import TrainParams
from kdas.training.losses import boundary_weight, structure_term
from kdas.training.optim import official_optimizer

Precision = Callable[[], contextlib.AbstractContextManager]
Maps = tuple[Tensor, Tensor]
TeacherLoader = Callable[[], ModelFile]


class SegmentationTask(ABC):
    """One training step's forward passes and loss, for a (P1, P2) segmentation model.

    The forward passes run under `precision` (the engine's autocast); the loss runs outside
    it, in fp32: its boundary weights, sums over 100k pixels and the teacher's P P^T matmuls
    lose too much in bf16. `compile` hands the loss to torch.compile."""

    # the loss components a step reports besides "loss" (history.csv's train_* columns, MLflow, plots)
    components: ClassVar[tuple[str, ...]]
    # the input size of the teacher's view of each frame; None: no teacher
    teacher_size: int | None = None

    def __init__(self, *, weighted_bce: bool, precision: Precision = contextlib.nullcontext, compile: bool = False):
        self.weighted_bce = weighted_bce
        self.precision = precision
        self._loss = torch.compile(self.loss) if compile else self.loss

    @classmethod
    @abstractmethod
    def from_params(cls, params: Any, teacher: TeacherLoader | None, **options) -> SegmentationTask:
        """The task of the method's typed `params`; `options` go to __init__. `teacher` loads
        the teacher (None: there is none); only a method that distils calls it."""

    @abstractmethod
    def __call__(self, net: nn.Module, images: Tensor, masks: Tensor, teacher_images: Tensor | None = None) -> dict[str, Tensor]:
        """The loss components of `net` on a batch. `teacher_images`: the teacher's view of the
        same augmented frames, at `teacher_size` (a task without a teacher ignores them)."""

    def configure_optimizers(self, parameters: Iterable[nn.Parameter], train: TrainParams,
                             device: torch.device) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimizer of the student's `parameters` and its schedule (stepped once per epoch):
        the official recipe's (kdas.training.optim) unless a method needs its own."""
        return official_optimizer(parameters, train, device)

    def _student(self, net: nn.Module, images: Tensor) -> Maps:
        with record_function("forward"):
            return net(images)


class GroundTruthTask(SegmentationTask):
    """The structure loss against the ground truth, no teacher."""

    components = ("structure",)

    @classmethod
    def from_params(cls, params: Any, teacher: TeacherLoader | None, **options) -> GroundTruthTask:
        return cls(**options)  # a teacher, if any, is never loaded

    def loss(self, student: Maps, masks: Tensor) -> dict[str, Tensor]:
        structure = structure_term(student, masks, boundary_weight(masks), weighted_bce=self.weighted_bce)
        return {"loss": structure, "structure": structure}

    def __call__(self, net: nn.Module, images: Tensor, masks: Tensor, teacher_images: Tensor | None = None) -> dict[str, Tensor]:
        with self.precision():
            student = self._student(net, images)
        with record_function("loss"):
            return self._loss(student, masks)


class DistillationTask(SegmentationTask):
    """The ground truth and a frozen teacher: eval mode (BN statistics, no dropout), no
    gradients, its forward under inference_mode, on its own view of each frame. A method
    names its terms in `components` (after "structure") and computes them in `teacher_terms`;
    `weight` (>= 0) weighs their sum against the ground truth's term."""

    def __init__(self, teacher: ModelFile, *, weight: float, **options):
        if weight < 0:
            raise ValueError(f"the teacher terms' weight must be >= 0, got {weight}")
        self.teacher = teacher.model.requires_grad_(False).eval()
        self.teacher_size = teacher.image_size
        self.weight = weight
        super().__init__(**options)

    @classmethod
    def _load(cls, teacher: TeacherLoader | None) -> ModelFile:
        if teacher is None:
            raise ValueError(f"distill.method '{cls.__module__.rpartition('.')[2]}' needs a teacher: pass --teacher MODEL_FILE_OR_URI")
        return teacher()

    def _teacher_maps(self, images: Tensor, size: torch.Size) -> Maps:
        """The teacher's maps of `images`, at the student's map `size` (the teacher may see the frames larger)."""
        with record_function("teacher"), torch.inference_mode():
            maps = self.teacher(images)
            if maps[0].shape[-2:] != size:
                maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
        return tuple(m.clone() for m in maps)  # inference tensors cannot be saved for backward

    @abstractmethod
    def teacher_terms(self, student: Maps, teacher: Maps, weight: Tensor) -> dict[str, Tensor]:
        """Each teacher term by name (`components[1:]`), unweighted; `weight` is the batch's
        boundary weight (:func:`boundary_weight`), for terms weighted like the structure loss."""

    def loss(self, student: Maps, teacher: Maps, masks: Tensor) -> dict[str, Tensor]:
        weight = boundary_weight(masks)
        structure = structure_term(student, masks, weight, weighted_bce=self.weighted_bce)
        terms = self.teacher_terms(student, tuple(t.detach() for t in teacher), weight)
        return {"loss": structure + self.weight * sum(terms.values()), "structure": structure, **terms}

    def __call__(self, net: nn.Module, images: Tensor, masks: Tensor, teacher_images: Tensor | None = None) -> dict[str, Tensor]:
        with self.precision():
            student = self._student(net, images)
            teacher = self._teacher_maps(images if teacher_images is None else teacher_images, student[0].shape[-2:])
        with record_function("loss"):
            return self._loss(student, teacher, masks)
