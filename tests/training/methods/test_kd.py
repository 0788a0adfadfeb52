"""Method kd: plain pixel distillation, per pixel the binary KL of the sigmoid maps at T."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdas.training.losses import boundary_weight
from kdas.training.methods.kd import pixel_kd


def test_pixel_kd_is_the_binary_kl_at_temperature_times_t_squared(maps):
    student, teacher, mask = maps
    for temperature in (1.0, 4.0):
        p, q = torch.sigmoid(teacher / temperature), torch.sigmoid(student / temperature)
        kl = p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())
        assert pixel_kd(student, teacher, temperature).item() == pytest.approx((kl.mean() * temperature**2).item(), rel=1e-4)
        weight = boundary_weight(mask)
        weighted = ((weight * kl).sum((2, 3)) / weight.sum((2, 3))).mean() * temperature**2
        assert pixel_kd(student, teacher, temperature, weight).item() == pytest.approx(weighted.item(), rel=1e-4)


def test_pixel_kd_pulls_the_student_to_the_teacher_and_nowhere_else(maps):
    """Its gradient on the student's logits is T (p_s - p_t) per pixel (its mean): zero where
    they agree, so it cannot drown the ground truth once the student has learnt the teacher."""
    student, teacher, _ = maps
    student = student.clone().requires_grad_()
    teacher = teacher.clone().requires_grad_()
    temperature = 2.0
    pixel_kd(student, teacher, temperature).backward()
    expected = temperature * (torch.sigmoid(student / temperature) - torch.sigmoid(teacher / temperature)) / student[0].numel()
    assert torch.allclose(student.grad, expected.detach() / student.shape[0], atol=1e-7)
    assert teacher.grad is None
    assert pixel_kd(teacher.detach(), teacher.detach(), temperature).item() == pytest.approx(0, abs=1e-6)


def test_pixel_kd_rejects_bad_arguments(maps):
    student, teacher, _ = maps
    with pytest.raises(ValueError, match="temperature"):
        pixel_kd(student, teacher, 0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_kd(student, F.avg_pool2d(teacher, 2), 1.0)
