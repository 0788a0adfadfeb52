"""One tester for every model, as segmentation_models.pytorch's BaseModelTester: each name
of the registry (and the general `polyp_pvt` on other backbones) goes through forward,
backward, the input-size error and a save/reload round trip from the model file alone."""

from __future__ import annotations

import pytest
import torch

from kdas.checkpoint import load_model, save_model
from kdas.models import OUTPUT_STRIDE, create_model, list_models

BIG = {"polyp_pvt_b2"}  # seconds per step on CPU: the full tier only
GENERIC = {"polyp_pvt": "test_convnext"}  # the general form needs a backbone
CASES = [
    *[pytest.param(name, GENERIC.get(name), id=name, marks=[pytest.mark.slow] if name in BIG else []) for name in list_models()],
    pytest.param("polyp_pvt", "tf_efficientnet_lite0", id="polyp_pvt-tf_efficientnet_lite0"),
]
SIZE = 2 * OUTPUT_STRIDE


def build(name: str, backbone: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, backbone=backbone, pretrained="none")


@pytest.mark.parametrize(("name", "backbone"), CASES)
def test_forward_backward_at_any_valid_size(name, backbone):
    model = build(name, backbone).train()
    x = torch.randn(2, 3, SIZE, SIZE + OUTPUT_STRIDE)  # not square: height and width apart
    p1, p2 = model(x)
    assert p1.shape == p2.shape == (2, 1, SIZE, SIZE + OUTPUT_STRIDE)
    assert torch.isfinite(p1).all() and torch.isfinite(p2).all()
    (p1.mean() + p2.mean()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize(("name", "backbone"), CASES)
def test_an_input_size_off_the_stride_says_which_fit(name, backbone):
    model = build(name, backbone).eval()
    with pytest.raises(ValueError, match=rf"multiples of {OUTPUT_STRIDE}"):
        model(torch.randn(1, 3, SIZE + 1, SIZE))


@pytest.mark.parametrize(("name", "backbone"), CASES)
def test_save_and_reload_from_the_model_file_alone(name, backbone, tmp_path):
    model = build(name, backbone).eval()
    path = save_model(tmp_path / "m.pt", model, image_size=SIZE, info={"role": "test"})
    loaded = load_model(path)  # no name, backbone or params given: the file describes itself
    assert loaded.config == model.config() and loaded.image_size == SIZE and loaded.info["role"] == "test"
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected, got = model(x), loaded.model.eval()(x)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"PK\x03\x04" + bytes(64)])
def test_a_bad_model_file_is_one_value_error_naming_it(tmp_path, content):
    path = tmp_path / "best.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{path}: not a loadable model file"):
        load_model(path)
