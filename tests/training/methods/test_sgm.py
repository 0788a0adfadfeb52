"""Method sgm: the Symmetrical Guiding Module, MSE of the pooled P + P^T."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdas.training.methods.sgm import sgm_term, symmetric_guiding

STRIDE = 8


def test_sgm_is_zero_when_student_equals_teacher(maps):
    _, teacher, _ = maps
    assert symmetric_guiding(teacher.clone(), teacher, STRIDE).item() == 0.0


def test_sgm_compares_symmetric_embeddings(maps):
    student, teacher, _ = maps
    s = F.avg_pool2d(torch.sigmoid(student), STRIDE)
    t = F.avg_pool2d(torch.sigmoid(teacher), STRIDE)
    expected = F.mse_loss(s + s.transpose(-1, -2), t + t.transpose(-1, -2))
    assert symmetric_guiding(student, teacher, STRIDE).item() == pytest.approx(expected.item(), rel=1e-5)
    assert sgm_term((student, student), (teacher, teacher), pool_stride=STRIDE).item() == pytest.approx(2 * expected.item(), rel=1e-5)
    # an antisymmetric difference of the probability maps is invisible to P + P^T
    prob = 0.4 + 0.2 * torch.rand(1, 1, 8, 8, dtype=torch.float64)
    skew = 0.05 * torch.randn(1, 1, 8, 8, dtype=torch.float64)
    shifted = prob + skew - skew.transpose(-1, -2)
    assert symmetric_guiding(torch.logit(shifted), torch.logit(prob), 1).item() < 1e-10


def test_sgm_gradient_and_non_square_error(maps):
    student, teacher, _ = maps
    student = student.clone().requires_grad_()
    symmetric_guiding(student, teacher, STRIDE).backward()
    assert student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="square.*64x96"):
        symmetric_guiding(torch.zeros(1, 1, 64, 96), torch.zeros(1, 1, 64, 96), STRIDE)
    with pytest.raises(ValueError, match="pool_stride"):
        symmetric_guiding(student, teacher, 0)
