"""Losses of teacher training and distillation: pure torch functions, no state, no I/O.

Prediction maps are B x 1 x H x W *logits* (the models' P1 and P2), masks B x 1 x H x W in
[0, 1]. Every function computes in float32 whatever the input dtype (autocast-safe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdas.methods import ATTENTIONS, METHODS


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


def distillation_loss(
    method: str,
    student_out: tuple[Tensor, Tensor],
    teacher_out: tuple[Tensor, Tensor] | None,
    mask: Tensor,
    *,
    alpha: float,
    tau: float,
    pool_stride: int,
    attention: str,
    weighted_bce: bool,
) -> dict[str, Tensor]:
    """The training loss of a (P1, P2) model, with its components for logging.

    With ``S = structure(P1) + structure(P2)``, ``A`` the attention supervision and ``G``
    the symmetric guiding terms, each summed over P1 and P2 (the same teacher map supervises
    the same student map):

    - ``"none"`` (teacher training, or a student without a teacher): ``loss = S``;
    - ``"sgm"``: ``loss = (1 - alpha) * S + alpha * G`` (what the official KDAS code
      effectively trains, its attention term giving no gradient);
    - ``"kdas"``: ``loss = (1 - alpha) * S + alpha * (A + G)``.

    This mirrors the official ``train_kd_paper.py``: ``loss = (1 - alpha) * (S1 + S2) +
    alpha * ((kd1 + kd2) * tau**2 + sgm)``, i.e. alpha trades ground truth against the
    teacher as a convex combination and tau enters only the attention term (temperature
    and its tau**2 scaling, inside :func:`attention_supervision`). The official SGM
    covers P1 only; here it covers P1 and P2, like the attention term.

    Returns ``{"loss", "structure", "attention", "sgm"}``: the total (for backward) and the
    unweighted sums S, A, G (zero tensors when unused).
    """
    if method not in METHODS:
        raise ValueError(f"unknown distillation method {method!r}; expected one of {', '.join(METHODS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    s1, s2 = student_out
    weight = boundary_weight(mask)
    structure = structure_loss(s1, mask, weight, weighted_bce) + structure_loss(s2, mask, weight, weighted_bce)
    zero = structure.new_zeros(())
    if method == "none":
        return {"loss": structure, "structure": structure, "attention": zero, "sgm": zero}

    if teacher_out is None:
        raise ValueError(f"method {method!r} needs the teacher's outputs (teacher_out is None)")
    t1, t2 = (t.detach() for t in teacher_out)
    sgm = symmetric_guiding(s1, t1, pool_stride) + symmetric_guiding(s2, t2, pool_stride)
    if method == "kdas":
        attended = attention_supervision(s1, t1, tau, pool_stride, attention) + attention_supervision(
            s2, t2, tau, pool_stride, attention
        )
    else:
        attended = zero
    loss = (1 - alpha) * structure + alpha * (attended + sgm)
    return {"loss": loss, "structure": structure, "attention": attended, "sgm": sgm}
