"""Losses of teacher training and distillation: pure torch functions, no state, no I/O.

Prediction maps are B x 1 x H x W *logits* (the models' P1 and P2), masks B x 1 x H x W in
[0, 1]. Every function computes in float32 whatever the input dtype (autocast-safe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("none", "sgm", "kdas")


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


def structure_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """PraNet / Polyp-PVT structure loss: boundary-weighted BCE + weighted IoU, batch mean.

    The weight ``1 + 5 * |avgpool31(mask) - mask|`` emphasises pixels near mask boundaries.
    Unlike the official code (whose legacy ``reduce='none'`` argument makes the BCE an
    already-averaged scalar, so the weights are lost), the weights are applied per pixel.
    """
    _check_map("logits", logits)
    if mask.shape != logits.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from logits {tuple(logits.shape)}")
    logits = logits.float()
    mask = mask.float()
    weight = 1 + 5 * torch.abs(F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask)
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    wbce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))

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
    student_logits: Tensor, teacher_logits: Tensor, tau: float, pool_stride: int
) -> Tensor:
    """KDAS attention supervision for one prediction map.

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
    structure = structure_loss(s1, mask) + structure_loss(s2, mask)
    zero = structure.new_zeros(())
    if method == "none":
        return {"loss": structure, "structure": structure, "attention": zero, "sgm": zero}

    if teacher_out is None:
        raise ValueError(f"method {method!r} needs the teacher's outputs (teacher_out is None)")
    t1, t2 = (t.detach() for t in teacher_out)
    sgm = symmetric_guiding(s1, t1, pool_stride) + symmetric_guiding(s2, t2, pool_stride)
    if method == "kdas":
        attention = attention_supervision(s1, t1, tau, pool_stride) + attention_supervision(
            s2, t2, tau, pool_stride
        )
    else:
        attention = zero
    loss = (1 - alpha) * structure + alpha * (attention + sgm)
    return {"loss": loss, "structure": structure, "attention": attention, "sgm": sgm}
