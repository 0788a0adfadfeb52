"""Model files and ONNX exports that declare what they cannot be: sizes past params.yaml's
limits, a decoder or backbone larger than their own weights, a hub backbone; each one line,
before anything large is allocated and without contacting the hub."""

from __future__ import annotations

import time

import pytest
import torch
from click.testing import CliRunner

from kdas.checkpoint import load_model, save_model
from kdas.cli import main
from kdas.models import create_model


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


def test_onnx_metadata_declaring_a_huge_size_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from kdas.export import FORMAT, META, read_metadata

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
