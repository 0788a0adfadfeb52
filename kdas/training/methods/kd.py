"""Method kd: plain pixel distillation, the baseline every distillation paper compares
against (Hinton's soft targets, per pixel, as SKD's pixel term):
``loss = S + weight * KD``, with ``KD`` the binary KL divergence between the teacher's and
the student's sigmoid maps at temperature T (times T^2), each head against the teacher's same
head, weighted per pixel like the structure loss (near the mask's boundary most)."""

from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from kdas.config import SCHEMA, Float
from kdas.training.losses import check_pair
from kdas.training.task import DistillationTask, Maps, TeacherLoader


@dataclass(frozen=True, config=SCHEMA)
class Params:
    weight: Annotated[Float, Field(ge=0, le=1e3)]          # of KD against the structure loss (at 0: the loss is S)
    temperature: Annotated[Float, Field(ge=1e-3, le=1e3)]  # T: softens both maps; the term carries T^2


def pixel_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float, weight: Tensor | None = None) -> Tensor:
    """``T^2 * KL(sigmoid(t / T) || sigmoid(s / T))`` per pixel, the weighted mean over each
    image's pixels (`weight`: B x 1 x H x W, e.g. the boundary weight; None: a plain mean),
    averaged over the batch. Its gradient on the student's logits is ``T (p_s - p_t)`` per
    pixel: zero where the student agrees with the teacher. The teacher is detached."""
    check_pair(student_logits, teacher_logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s, t = student_logits.float() / temperature, teacher_logits.detach().float() / temperature
    p_t = t.sigmoid()
    kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    per_image = kl.mean(dim=(2, 3)) if weight is None else (weight * kl).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    return per_image.mean() * temperature**2


class Task(DistillationTask):
    components = ("structure", "kd")

    def __init__(self, teacher, *, weight: float, temperature: float, **options):
        if temperature <= 0:
            raise ValueError(f"distill.kd.temperature must be > 0, got {temperature}")
        super().__init__(teacher, weight=weight, **options)
        self.temperature = temperature

    @classmethod
    def from_params(cls, params: Params, teacher: TeacherLoader | None, **options) -> Task:
        return cls(cls._load(teacher), weight=params.weight, temperature=params.temperature, **options)

    def teacher_terms(self, student: Maps, teacher: Maps, weight: Tensor) -> dict[str, Tensor]:
        return {"kd": sum(pixel_kd(s, t, self.temperature, weight) for s, t in zip(student, teacher))}
