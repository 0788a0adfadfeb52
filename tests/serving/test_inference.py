"""`kdas predict` (kdas.serving.inference): outside a project it fails with a clear line and leaves no
MLflow store behind; an image past validation.max_size is refused before it is decoded."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import kdas_cli
from kdas.cli import main


def test_predict_outside_a_project_creates_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save("x.png")
    result = CliRunner().invoke(main, ["predict", "x.png"])
    assert result.exit_code == 2  # a usage error: the champion's default needs the project's params.yaml
    assert "no --model given and no params.yaml here: pass --model" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


@pytest.mark.slow
def test_predict_refuses_an_image_past_validation_max_size_before_decoding_it(workdir):
    from kdas.checkpoint import save_model
    from kdas.models import create_model

    save_model(workdir / "m.pt", create_model("polyp_pvt_tiny"), image_size=64)
    Image.fromarray(np.zeros((8, 4100, 3), np.uint8)).save(workdir / "wide.png")  # 4100 px wide, a few KB
    code, output = kdas_cli("predict", "wide.png", "--model", "m.pt", "--out", "pred")
    assert code == 1
    assert output.strip().splitlines()[-1] == ("error: wide.png: image too large (4100x8 px; at most 4096 px a side, "
                                               "validation.max_size in params.yaml)")
    assert not any((workdir / "pred").iterdir())


def test_maps_are_prepared_in_place_with_the_same_values():
    """prepare() works in one float32 array (a 9000 px square image's temporaries took
    gigabytes): its values are those of the plain formulas."""
    from kdas.maps import prepare

    logits = (np.random.default_rng(0).normal(size=(48, 80)) * 8).astype(np.float32)
    sigmoid = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    assert np.array_equal(prepare(logits, "calibrated"), sigmoid)
    published = (sigmoid - sigmoid.min()) / (sigmoid.max() - sigmoid.min() + 1e-8)
    np.testing.assert_allclose(prepare(logits, "published"), published, atol=1e-7)
    assert prepare(logits, "published").dtype == np.float32


@pytest.mark.parametrize("rows", [1, 3, 1024])
def test_the_overlay_blends_green_inside_the_mask_alone(rows):
    from kdas.commands.predict import overlay

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    mask = rng.random((7, 5)) > 0.5
    blended = overlay(image, mask, rows=rows)
    expected = (0.5 * image + 0.5 * np.array([0, 255, 0])).astype(np.uint8)
    assert np.array_equal(blended[~mask], image[~mask])
    assert np.abs(blended[mask].astype(int) - expected[mask]).max() <= 1
    assert blended.dtype == np.uint8 and not np.shares_memory(blended, image)


@pytest.mark.slow
def test_predict_outside_a_project_keeps_a_9000_px_square_png_under_3_gb(tmp_path):
    """Outside a project only PIL's pixel bound (89 Mpx) applies: an 81 Mpx PNG of 240 KB
    (peak 5.2 GB before the maps and the overlay were kept small) must fit, measured in a
    process of its own."""
    import subprocess
    import sys

    from helpers import tool_environ
    from kdas.checkpoint import save_model
    from kdas.models import create_model

    save_model(tmp_path / "m.pt", create_model("polyp_pvt_tiny"), image_size=64)
    frame = np.zeros((9000, 9000, 3), np.uint8)
    frame[2000:3000, 2000:3000] = 200
    Image.fromarray(frame).save(tmp_path / "big.png")
    del frame
    # a parent of its own, whose one child is the predict: its children's peak is the predict's
    measure = ("import resource, subprocess, sys; run = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(run.returncode)")
    run = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m", "kdas", "predict", "big.png", "--model", "m.pt",
                          "--out", "pred"], cwd=tmp_path, env={**tool_environ(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    peak_gb = int(run.stdout.split()[-1]) / 2**20  # KiB on Linux
    assert peak_gb < 3, f"kdas predict peaked at {peak_gb:.1f} GB"
    assert (tmp_path / "pred" / "big_mask.png").exists() and (tmp_path / "pred" / "big_overlay.jpg").exists()
