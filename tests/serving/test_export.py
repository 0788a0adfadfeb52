"""ONNX export, int8 quantisation and onnxruntime inference (kdas.serving.export, kdas.serving.onnx_runtime, `kdas export`,
`kdas predict --model X.onnx`, the ONNX artifact of a registered version, a full disk)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import DATASETS, SERVE, kdas_cli, tool_environ
from kdas.checkpoint import save_model
from kdas.cli import main
from kdas.data.synth import synth_frame
from kdas.models import create_model
from kdas.serving import export, onnx_runtime
from kdas.serving.inference import Segmenter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # each ONNX export takes seconds

SIZE = 64
PARITY = 1e-4  # max abs difference of the fp32 ONNX map from the torch map
KVASIR = DATASETS / "kvasir-seg" / "Kvasir-SEG" / "images"


def _synthetic(n: int = 3, seed: int = 0) -> list[np.ndarray]:
    """The project's synthetic frames at assorted sizes (not square, not multiples of 32)."""
    sizes = [(120, 150), (64, 64), (97, 203), (300, 41)][:n]
    return [cv2.resize(synth_frame(seed, k, 160, 0.0)[0], (w, h)) for k, (h, w) in enumerate(sizes)]


def _images(n: int = 3) -> list[np.ndarray]:
    """Real Kvasir frames where ../shared/datasets has them, synthetic ones otherwise."""
    from kdas.io import read_rgb

    if KVASIR.is_dir():
        return [read_rgb(p) for p in sorted(KVASIR.glob("*.jpg"))[:n]]
    return _synthetic(n)


def _model_file(path: Path, name: str, size: int = SIZE, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    model = create_model(name, pretrained="none").eval()
    return save_model(path, model, image_size=size, info={"role": "student", "epoch": 3})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model file and its fp32 export (one export for the module)."""
    root = tmp_path_factory.mktemp("export")
    model_file = _model_file(root / "tiny.pt", "polyp_pvt_tiny")
    return model_file, export.export_onnx(model_file, root / "tiny.onnx")


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


# --------------------------------------------------------------------------- export


def test_export_carries_metadata_and_a_dynamic_batch(tiny):
    model_file, onnx_file = tiny
    meta = onnx_runtime.read_metadata(onnx_file)
    assert meta["format"] == onnx_runtime.FORMAT and meta["precision"] == "fp32"
    assert (meta["arch"], meta["backbone"], meta["image_size"], meta["channel"]) == ("polyp_pvt", "test_convnext", SIZE, 32)
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5]  # the model's own, not ImageNet's
    assert meta["source"] == str(model_file) and meta["kdas_version"] and meta["info"] == {"role": "student", "epoch": 3}

    seg = onnx_runtime.OnnxSegmenter(onnx_file, device="cpu")
    (inp,) = seg.session.get_inputs()
    assert inp.name == "image" and inp.shape[1:] == [3, SIZE, SIZE] and isinstance(inp.shape[0], str)
    assert [o.name for o in seg.session.get_outputs()] == ["logits", "map"]
    for batch in (1, 5):  # the dynamic axis
        x = np.random.default_rng(batch).random((batch, 3, SIZE, SIZE), dtype=np.float32)
        logits, prob = seg.session.run(None, {"image": x})
        assert logits.shape == prob.shape == (batch, 1, SIZE, SIZE)
        np.testing.assert_allclose(prob, 1 / (1 + np.exp(-logits)), atol=1e-6)  # map = sigmoid(P1 + P2)


def test_fp32_map_matches_torch(tiny):
    model_file, onnx_file = tiny
    images = _images(3) + _synthetic(4)
    torch_maps = Segmenter.load(model_file, "cpu").predict(images, batch_size=3)
    onnx_maps = onnx_runtime.OnnxSegmenter(onnx_file, "cpu").predict(images, batch_size=3)
    assert _max_diff(onnx_maps, torch_maps) <= PARITY
    # the published preparation too
    assert _max_diff(onnx_runtime.OnnxSegmenter(onnx_file, "cpu").predict(images[:2], preparation="published"),
                     Segmenter.load(model_file, "cpu").predict(images[:2], preparation="published")) <= PARITY


def test_pvt_v2_b0_student_exports_with_parity(tmp_path):
    model_file = _model_file(tmp_path / "b0.pt", "polyp_pvt_b0", seed=1)
    onnx_file = export.export_onnx(model_file, tmp_path / "b0.onnx", source="models:/kdas-student/7")
    meta = onnx_runtime.read_metadata(onnx_file)
    assert (meta["backbone"], meta["source"]) == ("pvt_v2_b0", "models:/kdas-student/7")
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406])
    images = _images(2) + _synthetic(2)
    assert _max_diff(onnx_runtime.OnnxSegmenter(onnx_file, "cpu").predict(images),
                     Segmenter.load(model_file, "cpu").predict(images)) <= PARITY


# --------------------------------------------------------------------------- int8


def _manifest(tmp_path: Path) -> Path:
    """Train rows that read; test rows that point nowhere (reading one would fail)."""
    folder = tmp_path / "frames"
    folder.mkdir()
    rows = []
    for i, im in enumerate(_synthetic(4, seed=3)):
        Image.fromarray(im).save(folder / f"train{i}.png")
        rows.append({"split": "train", "image_path": str(folder / f"train{i}.png")})
    rows += [{"split": s, "image_path": str(tmp_path / f"missing_{s}.png")} for s in ("test", "val")]
    path = tmp_path / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_calibration_draws_from_the_train_split_only(tmp_path):
    manifest = pd.read_parquet(_manifest(tmp_path))
    images = export.calibration_images(manifest, n=10, seed=1)
    assert len(images) == 4 and all(im.dtype == np.uint8 and im.ndim == 3 for im in images)
    with pytest.raises(ValueError, match="no 'train' rows"):
        export.calibration_images(manifest[manifest["split"] != "train"])


def test_int8_cli_round_trip(tiny, tmp_path):
    model_file, onnx_file = tiny
    out = tmp_path / "tiny-int8.onnx"
    result = CliRunner().invoke(main, ["export", "--model", str(model_file), "--out", str(out), "--int8",
                                       "--manifest", str(_manifest(tmp_path)), "--calibration-images", "4"])
    assert result.exit_code == 0, result.output
    assert "int8" in result.output and out.is_file()
    meta = onnx_runtime.read_metadata(out)
    assert meta["precision"] == "int8" and "train split" in meta["calibration"] and meta["image_size"] == SIZE
    images = _synthetic(4)
    q = onnx_runtime.OnnxSegmenter(out, "cpu")
    assert any(n.op_type in ("QuantizeLinear", "QLinearConv") for n in _graph(out).node)
    fp32 = onnx_runtime.OnnxSegmenter(onnx_file, "cpu").predict(images)
    int8 = q.predict(images)
    assert [m.shape for m in int8] == [im.shape[:2] for im in images]
    assert max(float(np.abs(a - b).mean()) for a, b in zip(int8, fp32)) < 0.05  # close to fp32, not equal


def _graph(path: Path):
    import onnx

    return onnx.load_model(str(path)).graph


# --------------------------------------------------------------------------- predict


def test_predict_from_onnx_needs_no_torch(tiny, tmp_path):
    model_file, onnx_file = tiny
    image = _images(1)[0]
    Image.fromarray(image).save(tmp_path / "frame.png")
    code = textwrap.dedent(f"""
        import sys
        from kdas.cli import main
        try:
            main(["predict", {str(tmp_path / 'frame.png')!r}, "--model", {str(onnx_file)!r}, "--out", {str(tmp_path / 'out')!r},
                  "--device", "cpu"])
        except SystemExit as exc:
            assert not exc.code, exc.code
        heavy = sorted(m for m in ("torch", "timm", "mlflow") if m in sys.modules)
        assert not heavy, f"the onnxruntime path imported {{heavy}}"
        print("no torch")
    """)
    done = subprocess.run([sys.executable, "-c", code], env=tool_environ(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "no torch" in done.stdout, done.stdout + done.stderr
    mask = np.asarray(Image.open(tmp_path / "out" / "frame_mask.png")) > 127
    assert mask.shape == image.shape[:2] and (tmp_path / "out" / "frame_overlay.jpg").is_file()
    torch_mask = Segmenter.load(model_file, "cpu").predict([image])[0] >= 0.5
    assert (mask != torch_mask).mean() < 1e-3  # the same masks (a pixel at exactly 0.5 may flip)


# --------------------------------------------------------------------------- bad input


def test_a_file_that_is_not_a_kdas_model_is_one_clear_error(tmp_path):
    bogus = tmp_path / "notes.pt"
    bogus.write_text("not a model")
    result = CliRunner().invoke(main, ["export", "--model", str(bogus), "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1 and str(bogus) in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_a_corrupt_or_foreign_onnx_file_is_a_value_error_naming_it(tiny, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(tiny[1].read_bytes()[:5000])  # cut short
    with pytest.raises(ValueError, match=f"{corrupt}: not a loadable ONNX model"):
        onnx_runtime.OnnxSegmenter(corrupt)
    foreign = tmp_path / "identity.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 4, 4])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(foreign))
    with pytest.raises(ValueError, match=f"{foreign}: not a kdas ONNX export"):
        onnx_runtime.read_metadata(foreign)
    with pytest.raises(FileNotFoundError, match="kdas export"):
        onnx_runtime.OnnxSegmenter(tmp_path / "absent.onnx")
    result = CliRunner().invoke(main, ["predict", str(_png(tmp_path)), "--model", str(corrupt), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and f"error: {corrupt}: not a loadable ONNX model" in result.output


def _png(tmp_path: Path) -> Path:
    Image.fromarray(_synthetic(1)[0]).save(tmp_path / "frame.png")
    return tmp_path / "frame.png"


def test_an_image_of_the_wrong_type_is_a_clear_error(tiny, tmp_path):
    seg = onnx_runtime.OnnxSegmenter(tiny[1], "cpu")
    good = _synthetic(1)[0]
    for bad, says in [(good.astype(np.float32), "float32"), (good[..., 0], r"\(120, 150\)"), (good[..., :2], "shape"),
                      ("frame.png", "str"), (None, "NoneType")]:
        with pytest.raises(ValueError, match=f"image 1: expected an H x W x 3 uint8 RGB array, got .*{says}"):
            seg.predict([good, bad])
    text = tmp_path / "frame.png"
    text.write_text("no pixels here")
    result = CliRunner().invoke(main, ["predict", str(text), "--model", str(tiny[1]), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and str(text) in result.output and "Traceback" not in result.output


def test_export_refuses_an_output_that_is_not_onnx(tiny, tmp_path):
    result = CliRunner().invoke(main, ["export", "--model", str(tiny[0]), "--out", str(tmp_path / "model.pt")])
    assert result.exit_code == 1 and "must be a .onnx file" in result.output


# --------------------------------------------------------------------------- registry


def test_the_registered_version_carries_the_onnx_file_and_serves_on_onnxruntime(tiny, mlflow_store):
    import mlflow

    from kdas.serving.codec import decode_mask, encode_image
    from kdas.tracking.registry import register_model

    model_file, onnx_file = tiny
    version = register_model(model_file, "kdas-onnx-test", {"kvasir/meanDic": 0.7}, evaluation_data="synthetic-test",
                             serving_config={**SERVE, "runtime": "onnxruntime", "device": "cpu"})
    client = mlflow.tracking.MlflowClient()
    tags = client.get_model_version(version.name, version.version).tags
    assert tags["kdas.onnx"] == "artifacts/tiny.onnx"
    local = Path(mlflow.artifacts.download_artifacts(f"{version.model_uri}/artifacts/tiny.onnx"))
    meta = onnx_runtime.read_metadata(local)
    assert meta["precision"] == "fp32" and "kdas-onnx-test" in meta["source"]

    served = mlflow.pyfunc.load_model(version.model_uri)
    assert isinstance(served.unwrap_python_model().segmenter, onnx_runtime.OnnxSegmenter)
    images = _synthetic(2)
    frame = pd.DataFrame({"image": [encode_image(im) for im in images]})
    masks = [decode_mask(m) for m in served.predict(frame)["mask"]]
    expected = [m >= 0.5 for m in Segmenter.load(model_file, "cpu").predict(images)]
    assert all((a != b).mean() < 1e-3 for a, b in zip(masks, expected))
    with pytest.raises(ValueError, match="onnx=True"):
        register_model(model_file, "kdas-onnx-test", {}, evaluation_data="synthetic-test",
                       serving_config={**SERVE, "runtime": "onnxruntime"}, onnx=False)
    assert json.dumps(meta)  # plain values only


@pytest.mark.slow
def test_a_full_disk_during_export_is_one_line(workdir, full_disk):
    from kdas.checkpoint import save_model
    from kdas.models import create_model

    save_model(workdir / "m.pt", create_model("polyp_pvt_tiny"), image_size=64)  # ~1.8 MB of weights: the export does not fit
    code, output = kdas_cli("export", "--model", "m.pt", "--out", str(full_disk / "m.onnx"))
    assert code == 1 and output.startswith("error: disk full") and len(output.strip().splitlines()) == 1
    assert list(full_disk.iterdir()) == []
