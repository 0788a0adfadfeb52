"""The ground truth's loss (kdas.training.losses), shared by every method: the boundary
weight, the structure loss, their numerics. The teacher terms are tested with their methods
(tests/training/methods/), how the tasks combine them in test_distillation.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import disc_mask, extreme_logits, extreme_masks
from kdas.training.losses import boundary_weight, box_mean, structure_loss, structure_term

# ---- structure loss ------------------------------------------------------------------------


def test_structure_loss_applies_the_boundary_weights(maps):
    student, _, mask = maps
    weight = 1 + 5 * (F.avg_pool2d(mask, 31, stride=1, padding=15) - mask).abs()
    bce = F.binary_cross_entropy_with_logits(student, mask, reduction="none")
    weighted = ((weight * bce).sum((2, 3)) / weight.sum((2, 3))).mean()
    unweighted = bce.mean()  # what the official reduce='none' computes
    prob = student.sigmoid()
    inter = (prob * mask * weight).sum((2, 3))
    union = ((prob + mask) * weight).sum((2, 3))
    wiou = (1 - (inter + 1) / (union - inter + 1)).mean()

    loss = structure_loss(student, mask)
    assert loss.item() == pytest.approx((weighted + wiou).item(), rel=1e-5)
    assert abs(loss.item() - (unweighted + wiou).item()) > 1e-3
    # train.weighted_bce: false reproduces the official (unweighted) BCE
    assert structure_loss(student, mask, weighted_bce=False).item() == pytest.approx((unweighted + wiou).item(), rel=1e-5)


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (3, 1, 40, 72), (1, 1, 16, 20)])
def test_box_mean_is_avg_pool_with_the_padding_counted(shape):
    """The summed-area table equals avg_pool2d(31, stride 1, pad 15, count_include_pad=True),
    on binary masks and on the soft masks that multi-scale resizing makes, windows larger
    than the map included."""
    torch.manual_seed(0)
    for x in ((torch.rand(shape) > 0.5).float(), torch.rand(shape)):
        expected = F.avg_pool2d(x, kernel_size=31, stride=1, padding=15, count_include_pad=True)
        assert torch.allclose(box_mean(x, 15), expected, rtol=0, atol=1e-5)
    mask = disc_mask()
    assert torch.allclose(boundary_weight(mask), 1 + 5 * (F.avg_pool2d(mask, 31, 1, 15) - mask).abs(), atol=1e-5)


def test_structure_loss_near_zero_for_a_perfect_confident_prediction():
    for mask in extreme_masks().values():
        perfect = (mask * 2 - 1) * 20
        assert structure_loss(perfect, mask).item() < 1e-4
        assert structure_loss(-perfect, mask).item() > 1.0


def test_structure_loss_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="mask shape"):
        structure_loss(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 64, 64))


@pytest.mark.parametrize("mask_name", ["disc", "zeros", "ones"])
@pytest.mark.parametrize("logit_name", ["random", "+50", "-50", "+-50"])
def test_the_structure_loss_is_finite_on_extremes(mask_name, logit_name):
    student = extreme_logits()[logit_name].clone().requires_grad_()
    mask = extreme_masks()[mask_name]
    loss = structure_loss(student, mask)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_half_precision_inputs_are_computed_in_float32(maps):
    student, _, mask = maps
    loss = structure_term((student.bfloat16(),) * 2, mask, boundary_weight(mask), weighted_bce=True)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
