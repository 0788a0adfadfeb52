"""Losses: each term on its own, its gradient, its numerics, and how they combine."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import DATASETS, ROOT
from kdas.config import load_params
from kdas.data.transforms import to_tensor
from kdas.maps import resize
from kdas.io import binarise, read_mask, read_rgb
from kdas.losses import (ATTENTIONS, attention_supervision, attention_term, box_mean, boundary_weight, refined_map, sgm_term, structure_loss,
                         structure_term, symmetric_guiding)
from kdas.methods import METHODS
from kdas.models import create_model
from kdas.training.task import TASKS, GroundTruthTask, KDASTask, SGMTask, create_task

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
    mask = _disc_mask()
    assert torch.allclose(boundary_weight(mask), 1 + 5 * (F.avg_pool2d(mask, 31, 1, 15) - mask).abs(), atol=1e-5)


def test_structure_loss_near_zero_for_a_perfect_confident_prediction():
    for mask in _masks().values():
        perfect = (mask * 2 - 1) * 20
        assert structure_loss(perfect, mask).item() < 1e-4
        assert structure_loss(-perfect, mask).item() > 1.0


def test_structure_loss_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="mask shape"):
        structure_loss(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 64, 64))


# ---- attention supervision ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ATTENTIONS)
def test_attention_gives_the_student_a_real_gradient(maps, kind):
    student, teacher, _ = maps
    student = student.clone().requires_grad_()
    teacher = teacher.clone().requires_grad_()
    loss = attention_supervision(student, teacher, TAU, STRIDE, kind)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None  # teacher detached


def test_attention_is_zero_when_student_matches_its_target(maps):
    _, teacher, _ = maps
    assert attention_supervision(teacher.clone(), teacher, TAU, STRIDE, "pairwise").item() == pytest.approx(0, abs=1e-5)
    # spatial: the target is the teacher's self-attention-refined map
    assert attention_supervision(refined_map(teacher), teacher, TAU, STRIDE, "spatial").item() == pytest.approx(0, abs=1e-5)


def test_refined_map_is_the_official_scaled_dot_product_attention(maps):
    _, teacher, _ = maps
    official = F.scaled_dot_product_attention(teacher, teacher, teacher)  # train_kd_paper.py, before / temperature
    assert torch.allclose(refined_map(teacher), official, atol=1e-5)


def test_spatial_attention_is_kl_over_positions_times_tau_squared(maps):
    student, teacher, _ = maps
    q = torch.softmax(student.flatten(1) / TAU, dim=1)
    p = torch.softmax(F.scaled_dot_product_attention(teacher, teacher, teacher).flatten(1) / TAU, dim=1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    got = attention_supervision(student, teacher, TAU, STRIDE, "spatial")
    assert got.item() == pytest.approx((kl * TAU**2).item(), rel=1e-4)


def test_pairwise_attention_is_kl_of_row_softmaxes_times_tau_squared(maps):
    student, teacher, _ = maps
    s = torch.tanh(F.avg_pool2d(student, STRIDE).flatten(1) / 2)  # signed confidences
    t = torch.tanh(F.avg_pool2d(teacher, STRIDE).flatten(1) / 2)
    q = torch.softmax(s[:, :, None] * s[:, None, :] / TAU, dim=-1)
    p = torch.softmax(t[:, :, None] * t[:, None, :] / TAU, dim=-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    got = attention_supervision(student, teacher, TAU, STRIDE, "pairwise")
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
    for kind in ATTENTIONS:
        with pytest.raises(ValueError, match="tau"):
            attention_supervision(student, teacher, 0.0, STRIDE, kind)
        with pytest.raises(ValueError, match="differ in shape"):
            attention_supervision(student, teacher[..., :32, :32], TAU, STRIDE, kind)
    with pytest.raises(ValueError, match="pool_stride"):
        attention_supervision(student, teacher, TAU, 0, "pairwise")
    with pytest.raises(ValueError, match="unknown attention"):
        attention_supervision(student, teacher, TAU, STRIDE, "channel")


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
        **{f"attention {kind}": attention_supervision(student, teacher, TAU, STRIDE, kind) for kind in ATTENTIONS},
        "sgm": symmetric_guiding(student, teacher, STRIDE),
    }
    for name, value in terms.items():
        assert torch.isfinite(value), name
        (grad,) = torch.autograd.grad(value, student, retain_graph=True)
        assert torch.isfinite(grad).all(), name


def test_half_precision_inputs_are_computed_in_float32(maps):
    student, teacher, mask = maps
    task = KDASTask(torch.nn.Identity(), alpha=0.3, attention="spatial", tau=TAU, pool_stride=STRIDE, weighted_bce=True)
    out = task.loss((student.bfloat16(),) * 2, (teacher.bfloat16(),) * 2, mask)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


def test_bf16_autocast_and_fp32_losses_agree_on_a_fixed_batch():
    """The engine's bf16 path (forward under autocast, losses in fp32 outside it) gives the
    fp32 losses within 1e-2 relative. CPU autocast runs bf16 on any x86 CPU."""
    torch.manual_seed(0)
    student, teacher = create_model("polyp_pvt_tiny"), create_model("polyp_pvt_tiny")
    images, masks = torch.rand(2, 3, 64, 64), _disc_mask()
    distill = load_params(ROOT / "params.yaml").distill
    fp32 = create_task(distill, lambda: teacher, weighted_bce=True)(student, images, masks)
    bf16 = create_task(distill, lambda: teacher, weighted_bce=True, precision=lambda: torch.autocast("cpu", dtype=torch.bfloat16))(
        student, images, masks)
    for k in ("loss", "structure", "attention", "sgm"):
        assert bf16[k].dtype == torch.float32
        assert bf16[k].item() == pytest.approx(fp32[k].item(), rel=1e-2), k


# ---- the methods' tasks -----------------------------------------------------------------------

KEYS = ["loss", "structure", "attention", "sgm"]  # history.csv's columns, in order, whatever the method


def _task(method: str, alpha: float = 0.3, attention: str = "spatial", teacher=None):
    distill = types.SimpleNamespace(method=method, attention=attention, alpha=alpha, tau=TAU, pool_stride=STRIDE, seed=0)
    return create_task(distill, lambda: teacher or torch.nn.Identity(), weighted_bce=True)


def test_each_method_is_a_task_type():
    assert tuple(TASKS) == METHODS
    assert [type(_task(method)) for method in METHODS] == [GroundTruthTask, SGMTask, KDASTask]
    assert type(create_task(None, None, weighted_bce=True)) is GroundTruthTask  # no distill: the ground truth alone


def test_the_ground_truth_task_is_structure_only_and_never_loads_a_teacher(maps):
    student, _, mask = maps
    task = create_task(types.SimpleNamespace(method="none"), lambda: pytest.fail("method none loaded the teacher"), weighted_bce=True)
    out = task.loss((student, student * 0.5), mask)
    assert list(out) == KEYS
    expected = structure_loss(student, mask) + structure_loss(student * 0.5, mask)
    assert out["loss"].item() == pytest.approx(expected.item())
    assert out["attention"].item() == 0 and out["sgm"].item() == 0
    assert structure_term((student, student * 0.5), mask, weighted_bce=True).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("method", ["sgm", "kdas"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_distillation_methods_combine_terms(maps, method, attention):
    student, teacher, mask = maps
    s1 = student.clone().requires_grad_()
    s2 = (student * 0.5).detach().requires_grad_()
    t1, t2 = teacher, teacher * 0.8
    alpha = 0.3
    out = _task(method, alpha, attention).loss((s1, s2), (t1, t2), mask)
    assert list(out) == KEYS
    structure = structure_loss(s1, mask) + structure_loss(s2, mask)
    sgm = symmetric_guiding(s1, t1, STRIDE) + symmetric_guiding(s2, t2, STRIDE)
    attended = (
        attention_supervision(s1, t1, TAU, STRIDE, attention) + attention_supervision(s2, t2, TAU, STRIDE, attention)
        if method == "kdas"
        else torch.tensor(0.0)
    )
    assert out["structure"].item() == pytest.approx(structure.item(), rel=1e-5)
    assert out["sgm"].item() == pytest.approx(sgm.item(), rel=1e-5)
    assert sgm_term((s1, s2), (t1, t2), pool_stride=STRIDE).item() == pytest.approx(sgm.item(), rel=1e-5)
    assert out["attention"].item() == pytest.approx(attended.item(), rel=1e-5)
    assert (out["attention"].item() > 0) == (method == "kdas")
    if method == "kdas":
        got = attention_term((s1, s2), (t1, t2), attention=attention, tau=TAU, pool_stride=STRIDE)
        assert got.item() == pytest.approx(attended.item(), rel=1e-5)
    expected = (1 - alpha) * structure + alpha * (attended + sgm)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["loss"].backward()
    assert s1.grad.abs().sum() > 0 and s2.grad.abs().sum() > 0


def test_a_step_computes_the_boundary_weight_once(maps, monkeypatch):
    """P1, P2 and the terms share one boundary weight per batch: its box filter is the dearest
    part of the structure loss on the CPU."""
    _, _, mask = maps
    calls = []
    real = boundary_weight
    monkeypatch.setattr("kdas.losses.boundary_weight", lambda m: calls.append(m) or real(m))
    net = create_model("polyp_pvt_tiny")
    _task("kdas", teacher=create_model("polyp_pvt_tiny"))(net, torch.rand(2, 3, SIZE, SIZE), mask)
    assert len(calls) == 1


def test_distillation_freezes_and_detaches_the_teacher(maps):
    student, teacher, mask = maps
    model = create_model("polyp_pvt_tiny").train()
    task = _task("kdas", teacher=model)
    assert task.teacher is model and not model.training and not any(p.requires_grad for p in model.parameters())
    teacher = teacher.clone().requires_grad_()
    out = task.loss((student, student), (teacher, teacher), mask)
    assert not out["attention"].requires_grad and not out["sgm"].requires_grad


def test_task_errors(maps):
    with pytest.raises(ValueError, match="unknown distill.method 'kd'.*none, sgm, kdas"):
        _task("kd")
    for method in ("sgm", "kdas"):
        with pytest.raises(ValueError, match=f"'{method}' needs a teacher"):
            create_task(types.SimpleNamespace(method=method, attention="spatial", alpha=0.3, tau=TAU, pool_stride=STRIDE), None,
                        weighted_bce=True)
        with pytest.raises(ValueError, match="alpha"):
            _task(method, alpha=1.5)
    with pytest.raises(ValueError, match="unknown distill.attention 'channel'.*spatial, pairwise"):
        _task("kdas", attention="channel")


# ---- signal on real images ------------------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.skipif(not DATASETS.exists(), reason=f"{DATASETS} not present")
def test_every_distillation_term_carries_signal_on_real_images():
    """Each term's gradient on the student's logits, relative to the structure loss's, for 8
    real Kvasir images at 224 px, an untrained PVTv2-B0 student and a teacher that predicts
    the masks. Every attention form must carry real signal (the official code's term carried
    none): pairwise measures ~2%, spatial more; on real data spatial's larger share drowned the
    ground truth, hence the pairwise default (benchmarks/results/real-cpu.md)."""
    root = DATASETS / "kvasir-seg" / "Kvasir-SEG"
    stems = sorted(p.stem for p in (root / "images").glob("*.jpg"))[:8]
    images = torch.stack([to_tensor(resize(read_rgb(root / "images" / f"{s}.jpg"), 224)) for s in stems])
    masks = torch.stack([torch.from_numpy(resize(binarise(read_mask(root / "masks" / f"{s}.jpg")).astype("uint8"), 224, mask=True)).float()[None]
                         for s in stems])
    torch.manual_seed(0)
    logits, _ = create_model("polyp_pvt_b0")(images)
    teacher = (masks * 2 - 1) * 6
    terms = {
        "structure": structure_loss(logits, masks),
        "sgm": symmetric_guiding(logits, teacher, STRIDE),
        **{kind: attention_supervision(logits, teacher, TAU, STRIDE, kind) for kind in ATTENTIONS},
    }
    norms = {k: torch.autograd.grad(v, logits, retain_graph=True)[0].norm().item() for k, v in terms.items()}
    ratios = {k: norms[k] / norms["structure"] for k in terms if k != "structure"}
    print("gradient norm relative to the structure loss's:", {k: round(v, 3) for k, v in ratios.items()})
    assert all(ratios[kind] >= 0.01 for kind in ATTENTIONS), ratios
    assert ratios["sgm"] >= 0.1
