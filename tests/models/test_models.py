"""Models: forward/backward, sizes, registry, complexity figures, backbone weight loading; model
files and ONNX exports that declare what they cannot be (sizes past params.yaml's limits, a
decoder or backbone larger than their own weights, a hub backbone) and a full disk."""

from __future__ import annotations

import logging
import time

import pytest
import timm
import torch
from click.testing import CliRunner

from kdas.checkpoint import load_model, save_model
from kdas.cli import main
from kdas.models import LoadReport, count_macs, count_parameters, create_model, list_models, load_backbone_weights


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("polyp_pvt_tiny")


def test_registry_lists_teacher_student_and_tiny():
    assert {"polyp_pvt_b2", "polyp_pvt_b0", "polyp_pvt_tiny"} <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'polyp_pvt_b9'.*polyp_pvt_b0.*polyp_pvt_b2"):
        create_model("polyp_pvt_b9")


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (128, 128), (64, 96), (96, 64)])
def test_tiny_forward_backward(tiny, size):
    tiny.train()
    tiny.zero_grad()
    x = torch.randn(2, 3, *size)
    out = tiny(x)
    assert isinstance(out, tuple) and len(out) == 2
    for p in out:
        assert p.shape == (2, 1, *size)
        assert torch.isfinite(p).all()
    (out[0].mean() + out[1].mean()).backward()
    grads = [p.grad for p in tiny.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # both the backbone and both heads learn
    assert tiny.backbone.stem_0.weight.grad.abs().sum() > 0
    assert tiny.head_cfm.weight.grad.abs().sum() > 0
    assert tiny.head_sam.weight.grad.abs().sum() > 0


def test_tiny_eval_is_deterministic(tiny):
    tiny.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = tiny(x), tiny(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_student_forward_backward_64px(size):
    torch.manual_seed(0)
    model = create_model("polyp_pvt_b0")
    p1, p2 = model(torch.randn(2, 3, *size))
    assert p1.shape == p2.shape == (2, 1, *size)
    (p1.mean() + p2.mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((100, 100), r"100x100.*multiples of 32.*height: 96 or 128.*width: 96 or 128"),
        ((64, 70), r"64x70.*height: 64 or 96.*width: 64 or 96"),
        ((20, 64), r"20x64.*height: 32;"),
    ],
)
def test_bad_input_size_says_which_sizes_fit(tiny, size, message):
    with pytest.raises(ValueError, match=message):
        tiny(torch.randn(1, 3, *size))


@pytest.mark.parametrize(
    ("name", "params", "gmacs"),
    [("polyp_pvt_b2", 25.1e6, 10.8), ("polyp_pvt_b0", 3.65e6, 1.9)],
)
def test_paper_complexity_at_352(name, params, gmacs):
    model = create_model(name, pretrained="none")
    assert count_parameters(model) == pytest.approx(params, rel=0.02)
    model.train()
    assert count_macs(model, 352) / 1e9 == pytest.approx(gmacs, rel=0.02)
    assert model.training  # count_macs restores the mode


def test_hub_failure_says_to_pass_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Name or service not known")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"test_convnext.*local file"):
        create_model("polyp_pvt_tiny", pretrained="hub")


# ---- backbone weights ----------------------------------------------------------------------


def _timm_checkpoint(arch: str = "test_convnext", seed: int = 1) -> dict[str, torch.Tensor]:
    """A backbone state_dict as timm publishes it: random init, classification head included."""
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False).state_dict()


def _backbone_equals(model, state_dict) -> bool:
    # features_only backbones flatten the first level: "stages.0.x" -> "stages_0.x"
    own = {k.replace(".", "_"): v for k, v in model.backbone.state_dict().items()}
    return all(
        torch.equal(own[k.replace(".", "_")], v) for k, v in state_dict.items() if not k.startswith("head.")
    )


def test_load_pth_reports_head_as_unexpected(tmp_path, caplog):
    sd = _timm_checkpoint()
    path = tmp_path / "test_convnext.pth"
    torch.save(sd, path)
    with caplog.at_level(logging.INFO, logger="kdas.models"):
        model = create_model("polyp_pvt_tiny", pretrained=str(path))
    assert _backbone_equals(model, sd)
    assert "unexpected" in caplog.text and str(path) in caplog.text

    report = load_backbone_weights(create_model("polyp_pvt_tiny"), path)
    assert isinstance(report, LoadReport)
    assert report.missing == []
    assert report.unexpected and all(k.startswith("head.") for k in report.unexpected)
    assert report.loaded == len(sd) - len(report.unexpected)
    text = str(report)
    assert str(path) in text and "head." in text and "0 missing" in text


def test_load_safetensors_nested_and_partial(tmp_path):
    from safetensors.torch import save_file

    sd = _timm_checkpoint()
    dropped = "stages.1.downsample.1.weight"
    partial = {k: v.contiguous() for k, v in sd.items() if k != dropped}
    path = tmp_path / "backbone.safetensors"
    save_file(partial, str(path))
    model = create_model("polyp_pvt_tiny")
    report = load_backbone_weights(model, path)
    assert report.missing == ["stages_1.downsample.1.weight"]  # named as in the backbone
    assert torch.equal(model.backbone.state_dict()["stages_0.blocks.0.conv_dw.weight"], sd["stages.0.blocks.0.conv_dw.weight"])

    nested = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "state_dict": sd}, nested)
    report = load_backbone_weights(create_model("polyp_pvt_tiny"), nested)
    assert report.missing == [] and report.loaded == len(sd) - len(report.unexpected)

    under_model = tmp_path / "under_model.pt"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, under_model)
    report = load_backbone_weights(create_model("polyp_pvt_tiny"), under_model)
    assert report.missing == []


def test_load_own_features_only_layout(tmp_path):
    source = create_model("polyp_pvt_tiny")
    path = tmp_path / "features.pth"
    torch.save(source.backbone.state_dict(), path)
    target = create_model("polyp_pvt_tiny")
    report = load_backbone_weights(target, path)
    assert report.missing == [] and report.unexpected == []
    for k, v in source.backbone.state_dict().items():
        assert torch.equal(target.backbone.state_dict()[k], v)


def test_load_original_pvt_v2_release_layout(tmp_path):
    """whai362's pvt_v2 naming (what the official Polyp-PVT loads), converted by timm."""
    sd = _timm_checkpoint("pvt_v2_b0")
    original = {}
    for k, v in sd.items():
        k = k.replace("patch_embed.", "patch_embed1.")
        for i in range(1, 4):
            k = k.replace(f"stages.{i}.downsample.", f"patch_embed{i + 1}.")
        for i in range(4):
            k = k.replace(f"stages.{i}.blocks.", f"block{i + 1}.").replace(f"stages.{i}.norm.", f"norm{i + 1}.")
        original[k.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")] = v
    assert "block1.0.attn.q.weight" in original
    path = tmp_path / "pvt_v2_b0.pth"
    torch.save(original, path)
    model = create_model("polyp_pvt_b0")
    report = load_backbone_weights(model, path)
    assert report.missing == []
    assert report.unexpected == ["head.bias", "head.weight"]
    assert torch.equal(model.backbone.state_dict()["stages_2.blocks.1.attn.kv.weight"], sd["stages.2.blocks.1.attn.kv.weight"])


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nowhere" / "pvt_v2_b2.pth"
    with pytest.raises(FileNotFoundError, match="pvt_v2_b2.pth"):
        create_model("polyp_pvt_tiny", pretrained=str(path))


def test_unreadable_file_names_it(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth"):
        load_backbone_weights(create_model("polyp_pvt_tiny"), path)


def test_checkpoint_of_other_backbone_is_refused(tmp_path):
    unrelated = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(2)}, unrelated)
    with pytest.raises(ValueError, match="no tensor in .*other.pth matches"):
        load_backbone_weights(create_model("polyp_pvt_tiny"), unrelated)

    wrong_size = tmp_path / "convnext2.pth"
    torch.save(_timm_checkpoint("test_convnext2"), wrong_size)
    with pytest.raises(ValueError, match="convnext2.pth.*wrong shape"):
        load_backbone_weights(create_model("polyp_pvt_tiny"), wrong_size)


# --------------------------------------------------------------------------- model files (kdas.checkpoint)
# Files and ONNX exports that declare what they cannot be: each one line, before anything large
# is allocated and without contacting the hub.


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> dict:
    path = save_model(tmp_path_factory.mktemp("model") / "m.pt", create_model("polyp_pvt_tiny"), image_size=64)
    return torch.load(path, weights_only=True)


def forged(tmp_path, payload, **changes):
    model = {**payload["model"], **changes.pop("model", {})}
    torch.save({**payload, "model": model, **changes}, tmp_path / "forged.pt")
    return tmp_path / "forged.pt"


@pytest.mark.parametrize("size,rule", [(20000, "out of range [32, 4096]"), (0, "out of range [32, 4096]"), (-64, "out of range [32, 4096]"),
                                       ("64", "out of range [32, 4096]"), (100, "must be a multiple of 32")])
def test_a_declared_image_size_is_bounded_as_in_params(tmp_path, payload, size, rule):
    path = forged(tmp_path, payload, image_size=size)
    with pytest.raises(ValueError, match=rf"forged.pt: image_size = {size!r} (is )?{rule.replace('[', '.').replace(']', '.')}"):
        load_model(path)


@pytest.mark.parametrize("model", [{"channel": 100_000}, pytest.param({"backbone": "convnext_xxlarge"}, marks=pytest.mark.slow),
                                   {"channel": 16}], ids=["huge channel", "huge backbone", "other channel"])
def test_an_architecture_that_does_not_fit_the_files_weights_is_refused_before_allocating(tmp_path, payload, model):
    path = forged(tmp_path, payload, model=model)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"forged.pt: its weights do not fit its own architecture \(\d+ tensor\(s\) differ, e.g. "):
        load_model(path)
    assert time.monotonic() - start < 5  # built on the meta device: no memory for 100000-wide convolutions


def test_a_hub_backbone_in_a_model_file_is_refused_without_contacting_the_hub(tmp_path, payload):
    path = forged(tmp_path, payload, model={"backbone": "hf-hub:timm/test_convnext.r160_in1k"})
    with pytest.raises(ValueError, match=r"forged.pt: backbone 'hf-hub:timm/test_convnext.r160_in1k' is not one of timm's model names"):
        load_model(path)


@pytest.mark.parametrize("norm", [{"std": [0.0, 0.0, 0.0]}, {"std": [0.5, -1.0, 0.5]}, {"mean": [float("nan"), 0.5, 0.5]}, {"std": [0.5]}])
def test_a_model_file_whose_normalisation_makes_nan_maps_is_refused(tmp_path, payload, norm):
    """std 0 divides every frame by zero: the maps were NaN, reported as 'polyp covers 0.0%'."""
    path = forged(tmp_path, payload, model=norm)
    with pytest.raises(ValueError, match=r"forged.pt: its normalisation .* std > 0: every map would be NaN"):
        load_model(path)


def test_onnx_metadata_declaring_a_huge_size_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from kdas.serving.onnx_runtime import FORMAT, META, read_metadata

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 64, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {f"{META}format": FORMAT, f"{META}image_size": "60000"})
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"m.onnx: kdas.image_size = 60000 is out of range \[32, 4096\]"):
        read_metadata(tmp_path / "m.onnx")


@pytest.mark.parametrize("size", ["0", "-352", "100"])
def test_import_teacher_refuses_an_unusable_image_size_before_writing(tmp_path, size):
    (tmp_path / "PolypPVT.pth").write_bytes(b"")
    out = tmp_path / "teacher.pt"
    result = CliRunner().invoke(main, ["import-teacher", str(tmp_path / "PolypPVT.pth"), "--out", str(out), "--image-size", size])
    assert result.exit_code == 1 and result.output.startswith(f"error: --image-size = {size}")
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.slow
def test_a_full_disk_saving_a_model_is_an_oserror_naming_the_file(workdir, full_disk):
    import errno

    with pytest.raises(OSError) as err:
        save_model(full_disk / "best.pt", create_model("polyp_pvt_tiny"), image_size=64)  # ~1.8 MB: does not fit
    assert err.value.errno == errno.ENOSPC and err.value.filename and "best.pt" in str(err.value.filename)
    assert list(full_disk.iterdir()) == []
