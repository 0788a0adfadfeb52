"""Losses of teacher training and distillation: pure torch functions, no state, no I/O.

Prediction maps are B x 1 x H x W *logits* (the models' P1 and P2), masks B x 1 x H x W in
[0, 1]. Every function computes in float32 whatever the input dtype (autocast-safe).

A model's two maps give three terms, each summed over P1 and P2: :func:`structure_term`
(the ground truth), :func:`sgm_term` and :func:`attention_term` (the teacher). Which terms a
method trains on, and how they combine, is its task's business (kdas.training.task).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdas.methods import ATTENTIONS


def _check_map(name: str, x: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{name} must be a B x 1 x H x W map, got shape {tuple(x.shape)}")


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    _check_map("student_logits", student)
    _check_map("teacher_logits", teacher)
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher maps differ in shape: {tuple(student.shape)} vs {tuple(teacher.shape)}"
        )


def _pool(x: Tensor, pool_stride: int) -> Tensor:
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
    _check_map("logits", logits)
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


def _attention_log_probs(logits: Tensor, tau: float, pool_stride: int) -> Tensor:
    """Row-wise log-distributions of the self-attention map of one prediction map: B x N x N."""
    # Signed confidences c = tanh(z / 2) = 2 sigmoid(z) - 1, not raw logits nor [0, 1]
    # probabilities. c_i c_j keeps the sign of the logits (a background position attends to
    # the background, a polyp position to the polyp), which plain probabilities lose
    # (p_i ~ 0 rows are uniform whatever the map). And it is bounded: on raw logits the
    # term follows the teacher's logit scale (measured ~15-50 against a structure loss of
    # ~2.5 on the synthetic data) and drowned the ground truth, the student's val meanDic
    # falling from 0.62 to 0.45 (12 epochs, see the distill stage's history.csv).
    z = torch.tanh(_pool(logits.float(), pool_stride).flatten(1) / 2)  # B x N
    attention = z.unsqueeze(2) * z.unsqueeze(1)  # B x N x N, A_ij = z_i z_j (P^T P)
    return F.log_softmax(attention / tau, dim=-1)


def attention_supervision(
    student_logits: Tensor, teacher_logits: Tensor, tau: float, pool_stride: int, kind: str
) -> Tensor:
    """KDAS attention supervision for one prediction map: ``kind`` is ``"spatial"``
    (:func:`spatial_attention_supervision`) or ``"pairwise"`` (:func:`pairwise_attention_supervision`)."""
    if kind == "spatial":
        return spatial_attention_supervision(student_logits, teacher_logits, tau)
    if kind == "pairwise":
        return pairwise_attention_supervision(student_logits, teacher_logits, tau, pool_stride)
    raise ValueError(f"unknown attention supervision {kind!r}; expected one of {', '.join(ATTENTIONS)}")


def refined_map(logits: Tensor) -> Tensor:
    """The teacher's self-attention-refined map, as the official code builds it: each row
    of the H x W logit map attends to every row, ``softmax(P P^T / sqrt(W)) P``."""
    p = logits.float().squeeze(1)  # B x H x W: rows are tokens, columns their features
    weights = torch.softmax(p @ p.transpose(1, 2) / p.shape[-1] ** 0.5, dim=-1)
    return (weights @ p).unsqueeze(1)


def spatial_attention_supervision(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """Attention supervision in the shape of the official code, with a real gradient.

    The teacher's self-attention-refined map (:func:`refined_map`) and the student's map
    each become a distribution over the H*W positions by a softmax at temperature ``tau``;
    the loss is ``KL(teacher || student) * tau**2``, averaged over the batch. (The official
    code takes the student's softmax over a channel axis of size 1, a constant, so its KL
    gives the student no gradient.) The teacher is detached.
    """
    _check_pair(student_logits, teacher_logits)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    log_q = F.log_softmax(student_logits.float().flatten(1) / tau, dim=1)
    log_p = F.log_softmax(refined_map(teacher_logits.detach()).flatten(1) / tau, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * tau**2


def pairwise_attention_supervision(
    student_logits: Tensor, teacher_logits: Tensor, tau: float, pool_stride: int
) -> Tensor:
    """Attention supervision on the pairwise self-attention map of each prediction map.

    Both logit maps are average-pooled by ``pool_stride`` and flattened to N
    positions; the self-attention map ``A = P^T P`` (N x N) becomes, row by row, a
    distribution over the N positions by a softmax at temperature ``tau``. The loss is
    ``KL(teacher || student) * tau**2`` (Hinton's scaling, so gradients keep their size as
    tau changes), averaged over the N rows and the batch. The teacher is detached.

    Memory: B x N x N floats, N = (H / pool_stride) * (W / pool_stride).
    """
    _check_pair(student_logits, teacher_logits)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    log_q = _attention_log_probs(student_logits, tau, pool_stride)
    log_p = _attention_log_probs(teacher_logits.detach(), tau, pool_stride)
    rows = log_q.shape[0] * log_q.shape[1]
    kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True) / rows
    return kl * tau**2


def symmetric_guiding(student_logits: Tensor, teacher_logits: Tensor, pool_stride: int) -> Tensor:
    """Symmetrical Guiding Module: MSE between the pooled ``P + P^T`` of student and teacher.

    P is the (pooled) probability map seen as an h x w matrix per image, so it must be
    square (training crops are). Probabilities, not the official code's logits: on logits
    the MSE follows the teacher's logit scale (measured ~500 against a structure loss of
    ~3) and the student stopped learning the ground truth (val meanDic 0.10 instead of
    0.64 after 12 epochs on the synthetic data). The teacher is detached.
    """
    _check_pair(student_logits, teacher_logits)
    height, width = student_logits.shape[-2:]
    if height != width:
        raise ValueError(
            f"symmetric_guiding needs square maps (P + P^T), got {height}x{width}; train on square crops"
        )

    def embed(logits: Tensor) -> Tensor:
        p = _pool(torch.sigmoid(logits.float()), pool_stride)
        return p + p.transpose(-1, -2)

    return F.mse_loss(embed(student_logits), embed(teacher_logits.detach()))


def structure_term(student_out: tuple[Tensor, Tensor], mask: Tensor, *, weighted_bce: bool) -> Tensor:
    """``S = structure(P1) + structure(P2)``, the ground truth's term of every method. The
    boundary weight depends on the mask alone: computed once, shared by P1 and P2."""
    s1, s2 = student_out
    weight = boundary_weight(mask)
    return structure_loss(s1, mask, weight, weighted_bce) + structure_loss(s2, mask, weight, weighted_bce)


def sgm_term(student_out: tuple[Tensor, Tensor], teacher_out: tuple[Tensor, Tensor], *, pool_stride: int) -> Tensor:
    """``G``: :func:`symmetric_guiding` summed over P1 and P2, each student map against the
    same teacher map (the official SGM covers P1 only). The teacher is detached."""
    (s1, s2), (t1, t2) = student_out, (t.detach() for t in teacher_out)
    return symmetric_guiding(s1, t1, pool_stride) + symmetric_guiding(s2, t2, pool_stride)


def attention_term(
    student_out: tuple[Tensor, Tensor], teacher_out: tuple[Tensor, Tensor], *, attention: str, tau: float, pool_stride: int
) -> Tensor:
    """``A``: :func:`attention_supervision` of form ``attention`` (``pool_stride`` pools the
    pairwise form's maps) summed over P1 and P2. tau is the temperature, the term carrying
    its tau**2 scaling. The teacher is detached."""
    (s1, s2), (t1, t2) = student_out, (t.detach() for t in teacher_out)
    return attention_supervision(s1, t1, tau, pool_stride, attention) + attention_supervision(s2, t2, tau, pool_stride, attention)
