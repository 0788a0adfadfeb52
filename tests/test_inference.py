"""`kdas predict` (kdas.inference): outside a project it fails with a clear line and leaves no
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
