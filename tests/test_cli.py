"""The `kdas` commands as a user types them, on the synthetic default (tiny settings)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from kdas.cli import COMMANDS, main

pytestmark = pytest.mark.slow


@pytest.fixture
def project(workdir, mlflow_store):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["data"]["synth"].update(n_images=20, size=64)
    tiny = {"arch": "polyp_pvt_tiny", "backbone": None, "weights": "none", "drop_path_rate": 0.0}
    params["model"].update(teacher=tiny, student=tiny)
    params["train"].update(image_size=64, epochs=1, workers=0)
    params["register"]["gate"]["floor"]["min"] = 0.0
    params["register"]["onnx"] = False  # seconds per version; tests/serving/test_export.py registers one with its export
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return workdir


def kdas(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_has_help():
    for cmd in (["data", "import"], ["data", "fetch"], ["data", "synth"], ["data", "manifest"], ["validate"], ["train", "teacher"],
                ["train", "student"], ["evaluate"], ["metrics"], ["register"], ["promote"], ["rollback"], ["predict"],
                ["export"], ["import-teacher"], ["plots"], ["params", "use"]):
        assert "Usage: " in kdas(*cmd, "--help") and "--help" in kdas(*cmd, "--help")
    listed = kdas("--help").split("Commands:")[1]  # from cli.COMMANDS, each command loaded only when it runs
    assert [line.split()[0] for line in listed.strip().splitlines()] == sorted(COMMANDS)


def test_data_train_each_method_evaluate_predict_and_score(project):
    kdas("data", "synth")
    assert "20 pairs" in kdas("data", "manifest")
    assert "data contract passed" in kdas("validate")
    out = kdas("train", "teacher")
    assert "model:   models/teacher/best.pt" in out and "metrics: models/teacher/metrics.json" in out and "MLflow:  run" in out
    for method in ("none", "kd", "sgm", "kdas"):
        out = kdas("train", "student", "--method", method, "--out", f"models/{method}")
        assert f"method {method}" in out and f"models/{method}/best.pt" in out
    out = kdas("evaluate", "--model", "models/kdas/best.pt")
    assert "synth" in out and "images/s" in out and (project / "reports/evaluate/student/grid.png").exists()

    # register, promote, rollback (the same evaluation data for both versions: like for like)
    assert "registered models:/kdas-student/1" in kdas("register", "--model", "models/kdas/best.pt")
    assert "version 1: promoted" in kdas("promote")
    assert "no new version" in kdas("register", "--model", "models/kdas/best.pt")  # a retry
    assert "registered models:/kdas-student/2" in kdas("register", "--model", "models/none/best.pt")
    assert "version 2: promoted" in kdas("promote")  # the same scores: within the margin
    assert "champion is version 1 again" in kdas("rollback")
    decision = json.loads((project / "reports/promotion/student.json").read_text())
    assert decision["challenger_evidence"]["data"] == decision["champion_evidence"]["data"] == json.loads(
        (project / "reports/evaluate/student/metrics.json").read_text())["data"]

    image = project / "data/raw/synth/images/synth_0001.png"
    kdas("predict", str(image), "--model", "models/kdas/best.pt", "--out", "pred")
    mask = np.asarray(Image.open(project / "pred/synth_0001_mask.png"))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}

    (project / "maps").mkdir()
    Image.open(project / "data/raw/synth/masks/synth_0001.png").save(project / "maps/synth_0001.png")
    result = CliRunner().invoke(main, ["metrics", "maps", "data/raw/synth/masks"])
    assert result.exit_code == 1 and "synth_0002" in result.output  # masks without predictions are named
    (project / "gt").mkdir()
    Image.open(project / "data/raw/synth/masks/synth_0001.png").save(project / "gt/synth_0001.png")
    kdas("metrics", "maps", "gt", "--json", "scores.json")
    assert json.loads((project / "scores.json").read_text())["dataset"]["meanDic"] > 0.99


def test_validation_failure_exits_1_naming_file_and_rule(project):
    kdas("data", "synth")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(project / "data/raw/synth/masks/synth_0003.png")
    kdas("data", "manifest")
    result = CliRunner().invoke(main, ["validate"])
    assert result.exit_code == 1
    assert "[mask_size] data/raw/synth/images/synth_0003.png" in result.output and "data contract FAILED" in result.output


def test_bad_params_say_what_is_wrong(project):
    text = (project / "params.yaml").read_text().replace("method: kdas", "method: magic")
    (project / "params.yaml").write_text(text)
    result = CliRunner().invoke(main, ["train", "student"])
    assert result.exit_code == 1 and "unknown distill.method 'magic'; expected one of none, kd, kdas, sgm" in result.output


def test_nproc_per_node_relaunches_training_under_torchrun(project, tool_env):
    import subprocess

    from mlflow.tracking import MlflowClient

    kdas("data", "synth")
    kdas("data", "manifest")
    text = (project / "params.yaml").read_text().replace("nproc_per_node: 1", "nproc_per_node: 2")
    (project / "params.yaml").write_text(text)
    out = subprocess.run(["kdas", "train", "teacher"], cwd=project, env={**tool_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("model:   models/teacher/best.pt") == 1  # rank 0 alone reports
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("kdas").experiment_id])
    assert [r.info.run_name for r in runs] == ["train_teacher"]  # and tracks
