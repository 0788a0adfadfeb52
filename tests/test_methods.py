"""The paper's method on any backbone: per-role models and weights, self-describing model
files, the published teacher, both map preparations, the paper profile's weights check."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import SHARED, distill_params, tool_environ
from kdas.checkpoint import load_model, save_model
from kdas.config import RoleModel, SplitParams, SynthParams, TrainParams, load_params, use_profile
from kdas.data.manifest import build_manifest
from kdas.data.synth import write_synth
from kdas.evaluation.evaluate import evaluate_model
from kdas.maps import prepare
from kdas.models import create_model
from kdas.serving.inference import Segmenter
from kdas.training import TrainJob, train

WEIGHTS = SHARED / "weights"
LITE = WEIGHTS.exists()
TRAIN = TrainParams(image_size=64, batch_size=4, epochs=1, lr=1e-3, weight_decay=1e-4, grad_clip=0.5, multiscale=[1.0], lr_decay=0.1,
                    decay_epochs=50, patience=20, seed=0, workers=0, nproc_per_node=1, amp=True, compile=False, augment=True, weighted_bce=True)
KDAS = distill_params("kdas", attention="spatial")


def _role(backbone: str) -> RoleModel:
    """EfficientNet-Lite with its ImageNet weights where ../shared/weights exists, else the tiny backbone."""
    if LITE:
        return RoleModel("polyp_pvt", backbone, str(WEIGHTS / f"{backbone}.in1k.safetensors"), 0.1)
    return RoleModel("polyp_pvt_tiny", None, "none", 0.0)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synth(root / "raw" / "synth", SynthParams(n_images=16, size=64, empty_fraction=0.0, seed=0))
    return build_manifest(root / "raw", ["synth"], SplitParams(val_fraction=0.25, test_fraction=0.25, seed=0),
                          near_duplicate_distance=4, workers=1)


@pytest.mark.slow
def test_teacher_and_student_train_distil_evaluate_and_reload_from_their_files(manifest, tmp_path):
    teacher = train(TrainJob(role="teacher", model=_role("tf_efficientnet_lite2"), manifest=manifest, out_dir=tmp_path / "t",
                             train=TRAIN, distill=None, max_steps=2))
    student = train(TrainJob(role="student", model=_role("tf_efficientnet_lite0"), manifest=manifest, out_dir=tmp_path / "s",
                             train=TRAIN, distill=KDAS, teacher=teacher.best_path, max_steps=2))
    for path, backbone in ((teacher.best_path, "tf_efficientnet_lite2"), (student.best_path, "tf_efficientnet_lite0")):
        loaded = load_model(path)  # no params.yaml involved
        assert loaded.image_size == 64
        if LITE:  # the model file records the backbone's own normalisation, not ImageNet's
            assert loaded.config["backbone"] == backbone and loaded.config["mean"] == [0.5] * 3 == loaded.config["std"]
    result = evaluate_model(Segmenter.load(student.best_path, "cpu"), manifest, tmp_path / "report", batch_size=4, grid_size=2)
    assert set(result) >= {"preparation", "datasets", "published", "efficiency"}
    assert set(result["published"]) == set(result["datasets"]) == {"synth", "mean"}
    assert "min-max" in result["preparation"]["published"]


@pytest.mark.skipif(not LITE, reason=f"{WEIGHTS} not present")
def test_each_role_loads_its_own_weights():
    from safetensors.torch import load_file

    for backbone in ("tf_efficientnet_lite0", "tf_efficientnet_lite2"):
        path = WEIGHTS / f"{backbone}.in1k.safetensors"
        model = create_model("polyp_pvt", backbone=backbone, pretrained=path)
        stem = load_file(str(path))["conv_stem.weight"]
        assert torch.equal(model.backbone.state_dict()["conv_stem.weight"], stem)
    with pytest.raises(ValueError, match="another model size"):  # lite2's file does not fit lite0
        create_model("polyp_pvt", backbone="tf_efficientnet_lite0", pretrained=WEIGHTS / "tf_efficientnet_lite2.in1k.safetensors")


@pytest.mark.slow
def test_the_paper_profile_without_weights_stops_in_seconds(workdir, manifest):
    manifest.to_parquet(workdir / "manifest.parquet")
    use_profile("paper")
    assert load_params().model.teacher.weights == "hub"
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "kdas", "train", "teacher", "--manifest", "manifest.parquet"],
                         capture_output=True, text=True, env={**tool_environ(), "HF_ENDPOINT": "https://hub.invalid"}, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert time.perf_counter() - started < 30
    assert re.search(r"error: .*pvt_v2_b2.*model hub.*local file.*model.<role>.weights", out.stderr)
    assert "Traceback" not in out.stderr and not (workdir / "models" / "teacher" / "best.pt").exists()


# ---- the published teacher --------------------------------------------------------------------

# ours -> the official Polyp-PVT module (lib/pvt.py), the inverse of kdas.models.official
OFFICIAL = [("reduce1.", "Translayer2_0."), ("reduce2.", "Translayer2_1."), ("reduce3.", "Translayer3_1."), ("reduce4.", "Translayer4_1."),
            ("cfm.conv_up", "CFM.conv_upsample"), ("cfm.conv_concat", "CFM.conv_concat"), ("cfm.conv_out.", "CFM.conv4."),
            ("cim.ca.", "ca."), ("cim.sa.conv.", "sa.conv1."), ("sam.gcn.node_conv.", "SAM.gcn.conv1."),
            ("sam.gcn.state_conv.", "SAM.gcn.conv2."), ("sam.", "SAM."), ("head_cfm.", "out_CFM."), ("head_sam.", "out_SAM.")]


def _whai362(key: str) -> str:
    """timm's PVTv2 key (features_only) -> the original release's (whai362/PVT, as Polyp-PVT loads it)."""
    key = re.sub(r"^stages_(\d)", r"stages.\1", key)
    key = key.replace("patch_embed.", "patch_embed1.")
    key = re.sub(r"^stages\.(\d)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", key)
    key = re.sub(r"^stages\.(\d)\.blocks\.(\d+)", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}", key)
    key = re.sub(r"^stages\.(\d)\.norm", lambda m: f"norm{int(m.group(1)) + 1}", key)
    return key.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")


def _official_state_dict(model) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            out["backbone." + _whai362(key[len("backbone."):])] = value
        else:
            ours, theirs = next((o, t) for o, t in OFFICIAL if key.startswith(o))
            out[theirs + key[len(ours):]] = value
    return out


@pytest.mark.slow
def test_an_official_polyp_pvt_checkpoint_imports_and_predicts_the_same(tmp_path):
    torch.manual_seed(3)
    original = create_model("polyp_pvt_b0").eval()
    torch.save(_official_state_dict(original), tmp_path / "PolypPVT.pth")
    assert any(k.startswith("backbone.block1.0.") for k in torch.load(tmp_path / "PolypPVT.pth"))  # the release's layout
    out = subprocess.run([sys.executable, "-m", "kdas", "import-teacher", str(tmp_path / "PolypPVT.pth"), "--backbone", "pvt_v2_b0",
                          "--image-size", "64", "--out", str(tmp_path / "teacher.pt")], capture_output=True, text=True, env=tool_environ())
    assert out.returncode == 0, out.stderr[-2000:]
    imported = load_model(tmp_path / "teacher.pt")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(original(x), imported.model(x)):
            assert torch.allclose(a, b, atol=1e-5)

    damaged = _official_state_dict(original)
    damaged.pop("out_SAM.weight")
    torch.save(damaged, tmp_path / "damaged.pth")
    out = subprocess.run([sys.executable, "-m", "kdas", "import-teacher", str(tmp_path / "damaged.pth"), "--backbone", "pvt_v2_b0",
                          "--out", str(tmp_path / "x.pt")], capture_output=True, text=True, env=tool_environ())
    assert out.returncode == 1 and "head_sam.weight" in out.stderr and "Traceback" not in out.stderr


def test_a_model_file_without_weights_is_a_clear_error(tmp_path):
    path = save_model(tmp_path / "m.pt", create_model("polyp_pvt_tiny"), image_size=64)
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]
    torch.save(payload, path)
    with pytest.raises(ValueError, match="damaged kdas model file"):
        load_model(path)


# ---- map preparations ---------------------------------------------------------------------------


def test_both_map_preparations_on_a_known_map():
    logits = np.array([[-8.0, -4.0], [0.0, 4.0]], dtype=np.float32)
    calibrated = prepare(logits, "calibrated")
    assert np.allclose(calibrated, 1 / (1 + np.exp(-logits)), atol=1e-6)
    published = prepare(logits, "published")  # min-max of the sigmoid, as the official test scripts
    sig = 1 / (1 + np.exp(-logits))
    assert np.allclose(published, (sig - sig.min()) / (sig.max() - sig.min() + 1e-8), atol=1e-6)
    assert published.min() == 0 and published.max() == pytest.approx(1, abs=1e-6)
    empty = np.full((4, 4), -10.0, dtype=np.float32)  # an empty frame: stays empty only when calibrated
    assert prepare(empty, "calibrated").max() < 1e-4 and prepare(empty + np.eye(4, dtype=np.float32), "published").max() > 0.99
    with pytest.raises(ValueError, match="unknown map preparation"):
        prepare(logits, "paper")
