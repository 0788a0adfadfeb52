"""What a training step optimises, as `timm.task` frames distillation: the method is a type.

`create_task` reads `distill.method` once and returns its task: `GroundTruthTask` (none:
the structure loss alone, no teacher), `SGMTask` or `KDASTask` (each with its frozen
teacher). A task runs the forward passes and returns the loss components; the engine calls
every task the same way and never asks which method it runs.

With ``S`` the structure term, ``G`` the symmetric guiding term and ``A`` the attention
term (kdas.losses, each summed over P1 and P2, the same teacher map supervising the same
student map):

- none (teacher training, or a student without a teacher): ``loss = S``;
- sgm: ``loss = (1 - alpha) * S + alpha * G`` (what the official KDAS code effectively
  trains, its attention term giving no gradient);
- kdas: ``loss = (1 - alpha) * S + alpha * (A + G)``.

This mirrors the official ``train_kd_paper.py``: ``loss = (1 - alpha) * (S1 + S2) + alpha *
((kd1 + kd2) * tau**2 + sgm)``, i.e. alpha trades ground truth against the teacher as a
convex combination and tau enters only the attention term (temperature and its tau**2
scaling). The official SGM covers P1 only; here it covers P1 and P2, like the attention term.

Every task returns the same components, ``{"loss", "structure", "attention", "sgm"}``: the
total (for backward) and the unweighted sums S, A, G, zero where its method has no such term
(history.csv has the same columns whatever the method).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from kdas.config import DistillParams
from kdas.losses import attention_term, sgm_term, structure_term
from kdas.methods import ATTENTIONS, METHODS, Attention, Method

Precision = Callable[[], contextlib.AbstractContextManager]
Maps = tuple[Tensor, Tensor]


def _components(structure: Tensor, loss: Tensor | None = None, attention: Tensor | None = None,
                sgm: Tensor | None = None) -> dict[str, Tensor]:
    """The components every task reports, in history.csv's order; a missing term is zero."""
    zero = structure.new_zeros(())
    return {"loss": structure if loss is None else loss, "structure": structure,
            "attention": zero if attention is None else attention, "sgm": zero if sgm is None else sgm}


class SegmentationTask(ABC):
    """One training step's forward passes and loss, for a (P1, P2) segmentation model.

    The forward passes run under `precision` (the engine's autocast); the loss runs outside
    it, in fp32: its boundary weights, sums over 100k pixels and the teacher's P P^T matmuls
    lose too much in bf16. `compile` hands the loss to torch.compile."""

    method: ClassVar[Method]

    def __init__(self, *, weighted_bce: bool, precision: Precision = contextlib.nullcontext, compile: bool = False):
        self.weighted_bce = weighted_bce
        self.precision = precision
        self._loss = torch.compile(self.loss) if compile else self.loss

    @classmethod
    @abstractmethod
    def from_params(cls, distill: DistillParams | None, teacher: Callable[[], nn.Module] | None, **options) -> SegmentationTask:
        """The task of `distill` (its method's fields only); `options` go to __init__."""

    @abstractmethod
    def __call__(self, net: nn.Module, images: Tensor, masks: Tensor, teacher_images: Tensor | None = None) -> dict[str, Tensor]:
        """The loss components of `net` on a batch. `teacher_images`: the same frames at the
        teacher's size, where it differs from the student's (a task without a teacher ignores them)."""

    def _student(self, net: nn.Module, images: Tensor) -> Maps:
        with record_function("forward"):
            return net(images)


class GroundTruthTask(SegmentationTask):
    """Method none: the structure loss against the ground truth, no teacher."""

    method = "none"

    @classmethod
    def from_params(cls, distill: DistillParams | None, teacher: Callable[[], nn.Module] | None, **options) -> GroundTruthTask:
        return cls(**options)  # a teacher, if any, is never loaded

    def loss(self, student: Maps, masks: Tensor) -> dict[str, Tensor]:
        return _components(structure_term(student, masks, weighted_bce=self.weighted_bce))

    def __call__(self, net: nn.Module, images: Tensor, masks: Tensor, teacher_images: Tensor | None = None) -> dict[str, Tensor]:
        with self.precision():
            student = self._student(net, images)
        with record_function("loss"):
            return self._loss(student, masks)


class DistillationTask(SegmentationTask):
    """Training against the ground truth and a frozen teacher: eval mode (BN statistics, no
    dropout), no gradients, its forward under inference_mode. `alpha` in [0, 1] weighs the
    teacher's terms against the ground truth's."""

    def __init__(self, teacher: nn.Module, *, alpha: float, **options):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.teacher = teacher.requires_grad_(False).eval()
        self.alpha = alpha
        super().__init__(**options)

    @classmethod
    def _load(cls, teacher: Callable[[], nn.Module] | None) -> nn.Module:
        if teacher is None:
            raise ValueError(f"distill.method '{cls.method}' needs a teacher: pass --teacher MODEL_FILE_OR_URI")
        return teacher()

    def _teacher_maps(self, images: Tensor, size: torch.Size) -> Maps:
        """The teacher's maps of `images`, at the student's map `size` (a teacher may see the frames larger)."""
        with record_function("teacher"), torch.inference_mode():
            maps = self.teacher(images)
            if maps[0].shape[-2:] != size:
                maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
        return tuple(m.clone() for m in maps)  # inference tensors cannot be saved for backward

    @abstractmethod
    def loss(self, student: Maps, teacher: Maps, masks: Tensor) -> dict[str, Tensor]: ...

    def __call__(self, net: nn.Module, images: Tensor, masks: Tensor, teacher_images: Tensor | None = None) -> dict[str, Tensor]:
        with self.precision():
            student = self._student(net, images)
            teacher = self._teacher_maps(images if teacher_images is None else teacher_images, student[0].shape[-2:])
        with record_function("loss"):
            return self._loss(student, teacher, masks)


class SGMTask(DistillationTask):
    """Method sgm: the ground truth and the Symmetrical Guiding Module, ``(1 - alpha) * S + alpha * G``."""

    method = "sgm"

    def __init__(self, teacher: nn.Module, *, alpha: float, pool_stride: int, **options):
        super().__init__(teacher, alpha=alpha, **options)
        self.pool_stride = pool_stride

    @classmethod
    def from_params(cls, distill: DistillParams, teacher: Callable[[], nn.Module] | None, **options) -> SGMTask:
        return cls(cls._load(teacher), alpha=distill.alpha, pool_stride=distill.pool_stride, **options)

    def loss(self, student: Maps, teacher: Maps, masks: Tensor) -> dict[str, Tensor]:
        structure = structure_term(student, masks, weighted_bce=self.weighted_bce)
        sgm = sgm_term(student, teacher, pool_stride=self.pool_stride)
        return _components(structure, (1 - self.alpha) * structure + self.alpha * sgm, sgm=sgm)


class KDASTask(DistillationTask):
    """Method kdas: the ground truth, attention supervision of form `attention` at temperature
    `tau`, and the Symmetrical Guiding Module, ``(1 - alpha) * S + alpha * (A + G)``."""

    method = "kdas"

    def __init__(self, teacher: nn.Module, *, alpha: float, attention: Attention, tau: float, pool_stride: int, **options):
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown distill.attention {attention!r}; expected one of {', '.join(ATTENTIONS)}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        super().__init__(teacher, alpha=alpha, **options)
        self.attention, self.tau, self.pool_stride = attention, tau, pool_stride

    @classmethod
    def from_params(cls, distill: DistillParams, teacher: Callable[[], nn.Module] | None, **options) -> KDASTask:
        return cls(cls._load(teacher), alpha=distill.alpha, attention=distill.attention, tau=distill.tau,
                   pool_stride=distill.pool_stride, **options)

    def loss(self, student: Maps, teacher: Maps, masks: Tensor) -> dict[str, Tensor]:
        structure = structure_term(student, masks, weighted_bce=self.weighted_bce)
        sgm = sgm_term(student, teacher, pool_stride=self.pool_stride)
        attended = attention_term(student, teacher, attention=self.attention, tau=self.tau, pool_stride=self.pool_stride)
        return _components(structure, (1 - self.alpha) * structure + self.alpha * (attended + sgm), attended, sgm)


TASKS: dict[str, type[SegmentationTask]] = {task.method: task for task in (GroundTruthTask, SGMTask, KDASTask)}
assert tuple(TASKS) == METHODS, f"kdas.methods names {METHODS}, the tasks {tuple(TASKS)}"


def create_task(distill: DistillParams | None, teacher: Callable[[], nn.Module] | None, *, weighted_bce: bool,
                precision: Precision = contextlib.nullcontext, compile: bool = False) -> SegmentationTask:
    """The task of `distill.method` (`distill` None: the ground truth alone, as method none).

    `teacher` loads the teacher model (None: there is none); only a method that distils calls
    it, and one that distils without it is a ValueError. The task freezes what it returns."""
    method = GroundTruthTask.method if distill is None else distill.method
    if method not in TASKS:
        raise ValueError(f"unknown distill.method {method!r}; expected one of {', '.join(METHODS)}")
    return TASKS[method].from_params(distill, teacher, weighted_bce=weighted_bce, precision=precision, compile=compile)
