"""Method kdas: attention supervision in both forms (each a real gradient), beside the SGM."""

from __future__ import annotations

import typing
import warnings

import pytest
import torch
import torch.nn.functional as F

from kdas.training.methods.kdas import FLAT, Attention, attention_supervision, centred, refined_map

TAU = 2.0
STRIDE = 8
SIZE = 64
FORMS = typing.get_args(Attention)


def _attention(student, teacher, kind, tau=TAU, pool_stride=STRIDE):
    return attention_supervision(student, teacher, attention=kind, tau=tau, pool_stride=pool_stride)


@pytest.mark.parametrize("kind", FORMS)
def test_attention_gives_the_student_a_real_gradient(maps, kind):
    student, teacher, _ = maps
    student = student.clone().requires_grad_()
    teacher = teacher.clone().requires_grad_()
    loss = _attention(student, teacher, kind)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None  # teacher detached


def test_attention_is_zero_when_student_matches_its_target(maps):
    _, teacher, _ = maps
    assert _attention(teacher.clone(), teacher, "correlation").item() == pytest.approx(0, abs=1e-5)
    # spatial: the target is the teacher's self-attention-refined map
    assert _attention(refined_map(teacher), teacher, "spatial").item() == pytest.approx(0, abs=1e-5)


def test_correlation_is_kl_of_row_softmaxes_of_the_centred_affinity(maps):
    student, teacher, _ = maps

    def rows(logits):
        c = torch.tanh(F.avg_pool2d(logits, STRIDE).flatten(1) / 2)
        z = (c - c.mean(1, keepdim=True)) / ((c - c.mean(1, keepdim=True)).pow(2).mean(1, keepdim=True) + FLAT).sqrt()
        return torch.softmax(z[:, :, None] * z[:, None, :] / TAU, dim=-1)

    q, p = rows(student), rows(teacher)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    assert _attention(student, teacher, "correlation").item() == pytest.approx((kl * TAU**2).item(), rel=1e-4)


def test_correlation_sees_where_the_polyp_is_not_how_sure_the_model_is(maps):
    """Centred and scaled per image: a teacher twice as confident gives nearly the same target
    (the confidences saturate) while the polyp elsewhere does not, and a flat map (an empty
    frame's) gives near-uniform rows. (z z^T does not see the sign of z: the structure loss
    does.)"""
    _, teacher, _ = maps
    z = centred(teacher, STRIDE)
    assert z.mean(1).abs().max() < 1e-5 and z.pow(2).mean(1).max() == pytest.approx(1.0, abs=0.05)
    moved = torch.roll(teacher, SIZE // 3, dims=-1)
    assert _attention(teacher, 2 * teacher, "correlation").item() < 0.1 * _attention(moved, teacher, "correlation").item()
    flat = torch.full_like(teacher, -8.0) + 1e-3 * torch.randn_like(teacher)
    assert centred(flat, STRIDE).abs().max() < 0.05


def test_refined_map_is_the_official_scaled_dot_product_attention(maps):
    _, teacher, _ = maps
    official = F.scaled_dot_product_attention(teacher, teacher, teacher)  # train_kd_paper.py, before / temperature
    assert torch.allclose(refined_map(teacher), official, atol=1e-5)


def test_spatial_attention_is_kl_over_positions_times_tau_squared(maps):
    student, teacher, _ = maps
    q = torch.softmax(student.flatten(1) / TAU, dim=1)
    p = torch.softmax(F.scaled_dot_product_attention(teacher, teacher, teacher).flatten(1) / TAU, dim=1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    assert _attention(student, teacher, "spatial").item() == pytest.approx((kl * TAU**2).item(), rel=1e-4)


def test_official_attention_formulation_gives_no_gradient(maps):
    """Documentation: the official KDAS code (train_kd_paper.py) softmaxes the student map
    over its channel axis, of size 1, so the student side is the constant 1 / tau; the KL
    against the teacher's attention (negative values) is NaN and the student learns nothing."""
    student, teacher, _ = maps
    student = student.clone().requires_grad_()
    teacher_att = F.scaled_dot_product_attention(teacher, teacher, teacher) / TAU
    student_side = torch.softmax(student, dim=1) / TAU
    assert torch.equal(student_side, torch.full_like(student_side, 1 / TAU))
    with warnings.catch_warnings():  # torch warns about reduction="mean"; the official code uses it
        warnings.simplefilter("ignore", UserWarning)
        official = F.kl_div(student_side, teacher_att, reduction="mean")
    official.backward()
    assert (teacher_att < 0).any() and torch.isnan(official)
    assert torch.count_nonzero(student.grad) == 0


def test_attention_rejects_bad_arguments(maps):
    student, teacher, _ = maps
    for kind in FORMS:
        with pytest.raises(ValueError, match="tau"):
            _attention(student, teacher, kind, tau=0.0)
        with pytest.raises(ValueError, match="differ in shape"):
            _attention(student, teacher[..., :32, :32], kind)
    with pytest.raises(ValueError, match="pool_stride"):
        _attention(student, teacher, "correlation", pool_stride=0)
    with pytest.raises(ValueError, match="unknown attention form 'channel'"):
        _attention(student, teacher, "channel")
