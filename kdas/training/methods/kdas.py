"""Method kdas: the ground truth, attention supervision and the Symmetrical Guiding Module,
``loss = S + weight * (A + G)`` (A :func:`attention_term`, G :func:`kdas.training.methods.sgm.sgm_term`).

The official code's attention term gives the student no gradient at all (its softmax runs
over a channel axis of size 1). Here both sides are proper distributions, compared by
``KL(teacher || student) * tau^2``, in one of two forms (`distill.kdas.attention`):

- ``correlation`` (the default): the self-attention map of each prediction map, with the
  map centred and scaled per image first (below), so that each row of the affinity is a
  sharp distribution over the positions of the same kind. Uncentred (round two's
  `pairwise`, the signed confidences' Gram matrix) every row lay within about +-0.5 before
  the softmax at tau 2, nearly uniform: its gradient was 0.022x the structure loss's on 8
  real Kvasir frames.
- ``spatial``: the official code's shape with a real gradient: the teacher's
  self-attention-refined map and the student's map, each a distribution over the H*W
  positions (the `paper` profile). On real data it pulled against the ground truth
  (benchmarks/results/real-cpu-round2.md).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from kdas.config import SCHEMA, Float, Int
from kdas.training.losses import check_pair, pool
from kdas.training.methods.sgm import sgm_term
from kdas.training.task import DistillationTask, Maps, TeacherLoader

Attention = Literal["correlation", "spatial"]
# the variance floor of the centred map: a flat map (an empty frame's) gives near-uniform
# rows instead of its noise scaled up (tanh-scale confidences: a spread under 0.1 is flat)
FLAT = 1e-2


@dataclass(frozen=True, config=SCHEMA)
class Params:
    weight: Annotated[Float, Field(ge=0, le=1e3)]   # of A + G against the structure loss (at 0: the loss is S)
    attention: Attention
    tau: Annotated[Float, Field(ge=1e-6, le=1e3)]   # the attention term's temperature (it carries tau^2)
    pool_stride: Annotated[Int, Field(ge=1, le=64)]  # maps are average-pooled by this before the affinity and P + P^T


def centred(logits: Tensor, pool_stride: int) -> Tensor:
    """A prediction map as B x N standardised signed confidences: ``c = tanh(z / 2)`` (2
    sigmoid(z) - 1, bounded, so the teacher's logit scale does not count), pooled, then
    centred and scaled to unit variance per image (what the affinity compares is where the
    polyp is, not how sure the model is)."""
    c = torch.tanh(pool(logits.float(), pool_stride).flatten(1) / 2)
    c = c - c.mean(dim=1, keepdim=True)
    return c / torch.sqrt(c.pow(2).mean(dim=1, keepdim=True) + FLAT)


def correlation_attention(student_logits: Tensor, teacher_logits: Tensor, tau: float, pool_stride: int) -> Tensor:
    """``KL(teacher || student) * tau^2`` between the row-wise softmaxes (at tau) of each map's
    affinity ``A = z z^T`` (N x N, z :func:`centred`), averaged over the N rows and the batch.
    Memory: B x N x N floats, N = (H / pool_stride) * (W / pool_stride). The teacher is detached."""
    check_pair(student_logits, teacher_logits)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")

    def rows(logits: Tensor) -> Tensor:
        z = centred(logits, pool_stride)
        return F.log_softmax(z.unsqueeze(2) * z.unsqueeze(1) / tau, dim=-1)

    log_q, log_p = rows(student_logits), rows(teacher_logits.detach())
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True) / (log_q.shape[0] * log_q.shape[1]) * tau**2


def refined_map(logits: Tensor) -> Tensor:
    """The teacher's self-attention-refined map, as the official code builds it: each row
    of the H x W logit map attends to every row, ``softmax(P P^T / sqrt(W)) P``."""
    p = logits.float().squeeze(1)  # B x H x W: rows are tokens, columns their features
    weights = torch.softmax(p @ p.transpose(1, 2) / p.shape[-1] ** 0.5, dim=-1)
    return (weights @ p).unsqueeze(1)


def spatial_attention(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """The official code's shape with a real gradient: the teacher's :func:`refined_map`
    and the student's map, each a distribution over the H*W positions by a softmax at
    ``tau``; ``KL(teacher || student) * tau^2``, averaged over the batch. The teacher is detached."""
    check_pair(student_logits, teacher_logits)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    log_q = F.log_softmax(student_logits.float().flatten(1) / tau, dim=1)
    log_p = F.log_softmax(refined_map(teacher_logits.detach()).flatten(1) / tau, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * tau**2


def attention_supervision(student_logits: Tensor, teacher_logits: Tensor, *, attention: str, tau: float, pool_stride: int) -> Tensor:
    """Attention supervision of one prediction map, in form `attention` (the module's docstring)."""
    if attention == "correlation":
        return correlation_attention(student_logits, teacher_logits, tau, pool_stride)
    if attention == "spatial":
        return spatial_attention(student_logits, teacher_logits, tau)
    raise ValueError(f"unknown attention form {attention!r}; expected correlation or spatial")


def attention_term(student: Maps, teacher: Maps, *, attention: str, tau: float, pool_stride: int) -> Tensor:
    """``A``: :func:`attention_supervision` summed over P1 and P2, each student map against the
    same teacher map."""
    return sum(attention_supervision(s, t, attention=attention, tau=tau, pool_stride=pool_stride) for s, t in zip(student, teacher))


class Task(DistillationTask):
    components = ("structure", "attention", "sgm")

    def __init__(self, teacher, *, weight: float, attention: str, tau: float, pool_stride: int, **options):
        if tau <= 0:
            raise ValueError(f"distill.kdas.tau must be > 0, got {tau}")
        super().__init__(teacher, weight=weight, **options)
        self.attention, self.tau, self.pool_stride = attention, tau, pool_stride

    @classmethod
    def from_params(cls, params: Params, teacher: TeacherLoader | None, **options) -> Task:
        return cls(cls._load(teacher), weight=params.weight, attention=params.attention, tau=params.tau,
                   pool_stride=params.pool_stride, **options)

    def teacher_terms(self, student: Maps, teacher: Maps, weight: Tensor) -> dict[str, Tensor]:
        return {"attention": attention_term(student, teacher, attention=self.attention, tau=self.tau, pool_stride=self.pool_stride),
                "sgm": sgm_term(student, teacher, pool_stride=self.pool_stride)}
