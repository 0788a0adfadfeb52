"""Losses: each term on its own, its gradient, its numerics, and how they combine."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from kdas.losses import attention_supervision, distillation_loss, structure_loss, symmetric_guiding

SIZE = 64
TAU = 2.0
STRIDE = 8


def _disc_mask(batch: int = 2, size: int = SIZE) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size * 0.45) ** 2 + (xx - size * 0.55) ** 2 < (size * 0.25) ** 2).float()
    return disc.expand(batch, 1, size, size).clone()


@pytest.fixture
def maps():
    torch.manual_seed(0)
    mask = _disc_mask()
    teacher = (mask * 2 - 1) * 6 + 0.5 * torch.randn_like(mask)
    student = torch.randn_like(mask)
    return student, teacher, mask


def _masks():
    return {
        "disc": _disc_mask(),
        "zeros": torch.zeros(2, 1, SIZE, SIZE),
        "ones": torch.ones(2, 1, SIZE, SIZE),
    }


def _logits():
    torch.manual_seed(1)
    return {
        "random": torch.randn(2, 1, SIZE, SIZE) * 3,
        "+50": torch.full((2, 1, SIZE, SIZE), 50.0),
        "-50": torch.full((2, 1, SIZE, SIZE), -50.0),
        "+-50": torch.randn(2, 1, SIZE, SIZE).sign() * 50,
    }


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


def test_structure_loss_near_zero_for_a_perfect_confident_prediction():
    for mask in _masks().values():
        perfect = (mask * 2 - 1) * 20
        assert structure_loss(perfect, mask).item() < 1e-4
        assert structure_loss(-perfect, mask).item() > 1.0


def test_structure_loss_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="mask shape"):
        structure_loss(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 64, 64))


# ---- attention supervision ----------------------------------------------------------------


def test_attention_gives_the_student_a_real_gradient(maps):
    student, teacher, _ = maps
    student = student.clone().requires_grad_()
    teacher = teacher.clone().requires_grad_()
    loss = attention_supervision(student, teacher, TAU, STRIDE)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None  # teacher detached


def test_attention_is_zero_when_student_equals_teacher(maps):
    _, teacher, _ = maps
    assert attention_supervision(teacher.clone(), teacher, TAU, STRIDE).item() == pytest.approx(0, abs=1e-5)


def test_attention_is_kl_of_row_softmaxes_times_tau_squared(maps):
    student, teacher, _ = maps
    s = torch.tanh(F.avg_pool2d(student, STRIDE).flatten(1) / 2)  # signed confidences
    t = torch.tanh(F.avg_pool2d(teacher, STRIDE).flatten(1) / 2)
    q = torch.softmax(s[:, :, None] * s[:, None, :] / TAU, dim=-1)
    p = torch.softmax(t[:, :, None] * t[:, None, :] / TAU, dim=-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    got = attention_supervision(student, teacher, TAU, STRIDE)
    assert got.item() == pytest.approx((kl * TAU**2).item(), rel=1e-4)


def test_official_attention_formulation_gives_no_gradient(maps):
    """Documentation: the official KDAS code (train_kd_paper.py) softmaxes the student map
    over its channel axis, of size 1, so the student side is the constant 1 / tau; the KL
    against the teacher's attention (negative values) is NaN and the student learns nothing.
    """
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
    with pytest.raises(ValueError, match="tau"):
        attention_supervision(student, teacher, 0.0, STRIDE)
    with pytest.raises(ValueError, match="pool_stride"):
        attention_supervision(student, teacher, TAU, 0)
    with pytest.raises(ValueError, match="differ in shape"):
        attention_supervision(student, teacher[..., :32, :32], TAU, STRIDE)


# ---- symmetric guiding ----------------------------------------------------------------------


def test_sgm_is_zero_when_student_equals_teacher(maps):
    _, teacher, _ = maps
    assert symmetric_guiding(teacher.clone(), teacher, STRIDE).item() == 0.0


def test_sgm_compares_symmetric_embeddings(maps):
    student, teacher, _ = maps
    s = F.avg_pool2d(torch.sigmoid(student), STRIDE)
    t = F.avg_pool2d(torch.sigmoid(teacher), STRIDE)
    expected = F.mse_loss(s + s.transpose(-1, -2), t + t.transpose(-1, -2))
    assert symmetric_guiding(student, teacher, STRIDE).item() == pytest.approx(expected.item(), rel=1e-5)
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


# ---- numerics -------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_name", ["disc", "zeros", "ones"])
@pytest.mark.parametrize("logit_name", ["random", "+50", "-50", "+-50"])
def test_every_term_finite_on_extremes(mask_name, logit_name):
    mask = _masks()[mask_name]
    logits = _logits()
    student = logits[logit_name].clone().requires_grad_()
    teacher = logits["+-50"] if logit_name != "+-50" else logits["random"]
    terms = {
        "structure": structure_loss(student, mask),
        "attention": attention_supervision(student, teacher, TAU, STRIDE),
        "sgm": symmetric_guiding(student, teacher, STRIDE),
    }
    for name, value in terms.items():
        assert torch.isfinite(value), name
        (grad,) = torch.autograd.grad(value, student, retain_graph=True)
        assert torch.isfinite(grad).all(), name


def test_half_precision_inputs_are_computed_in_float32(maps):
    student, teacher, mask = maps
    out = distillation_loss(
        "kdas", (student.bfloat16(),) * 2, (teacher.bfloat16(),) * 2, mask, alpha=0.3, tau=TAU, pool_stride=STRIDE
    )
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


# ---- combination ----------------------------------------------------------------------------

KEYS = {"loss", "structure", "attention", "sgm"}


def test_distillation_none_is_structure_only(maps):
    student, _, mask = maps
    out = distillation_loss("none", (student, student * 0.5), None, mask, alpha=0.3, tau=TAU, pool_stride=STRIDE)
    assert set(out) == KEYS
    expected = structure_loss(student, mask) + structure_loss(student * 0.5, mask)
    assert out["loss"].item() == pytest.approx(expected.item())
    assert out["attention"].item() == 0 and out["sgm"].item() == 0


@pytest.mark.parametrize("method", ["sgm", "kdas"])
def test_distillation_methods_combine_terms(maps, method):
    student, teacher, mask = maps
    s1 = student.clone().requires_grad_()
    s2 = (student * 0.5).detach().requires_grad_()
    t1, t2 = teacher, teacher * 0.8
    alpha = 0.3
    out = distillation_loss(method, (s1, s2), (t1, t2), mask, alpha=alpha, tau=TAU, pool_stride=STRIDE)
    assert set(out) == KEYS
    structure = structure_loss(s1, mask) + structure_loss(s2, mask)
    sgm = symmetric_guiding(s1, t1, STRIDE) + symmetric_guiding(s2, t2, STRIDE)
    attention = (
        attention_supervision(s1, t1, TAU, STRIDE) + attention_supervision(s2, t2, TAU, STRIDE)
        if method == "kdas"
        else torch.tensor(0.0)
    )
    assert out["structure"].item() == pytest.approx(structure.item(), rel=1e-5)
    assert out["sgm"].item() == pytest.approx(sgm.item(), rel=1e-5)
    assert out["attention"].item() == pytest.approx(attention.item(), rel=1e-5)
    assert (out["attention"].item() > 0) == (method == "kdas")
    expected = (1 - alpha) * structure + alpha * (attention + sgm)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["loss"].backward()
    assert s1.grad.abs().sum() > 0 and s2.grad.abs().sum() > 0


def test_distillation_detaches_the_teacher(maps):
    student, teacher, mask = maps
    teacher = teacher.clone().requires_grad_()
    out = distillation_loss("kdas", (student, student), (teacher, teacher), mask, alpha=0.3, tau=TAU, pool_stride=STRIDE)
    assert not out["attention"].requires_grad and not out["sgm"].requires_grad


def test_distillation_errors(maps):
    student, teacher, mask = maps
    with pytest.raises(ValueError, match="unknown distillation method 'kd'.*none, sgm, kdas"):
        distillation_loss("kd", (student, student), (teacher, teacher), mask, alpha=0.3, tau=TAU, pool_stride=STRIDE)
    with pytest.raises(ValueError, match="needs the teacher"):
        distillation_loss("kdas", (student, student), None, mask, alpha=0.3, tau=TAU, pool_stride=STRIDE)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss("sgm", (student, student), (teacher, teacher), mask, alpha=1.5, tau=TAU, pool_stride=STRIDE)
