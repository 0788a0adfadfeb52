"""`kdas predict` outside a project fails with a clear line and leaves no MLflow store behind."""

import numpy as np
from click.testing import CliRunner
from PIL import Image

from kdas.cli import main


def test_predict_outside_a_project_creates_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save("x.png")
    result = CliRunner().invoke(main, ["predict", "x.png"])
    assert result.exit_code == 2  # a usage error: the champion's default needs the project's params.yaml
    assert "no --model given and no params.yaml here: pass --model" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
