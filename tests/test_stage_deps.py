"""Each stage depends on its own code (issue 22): in a DVC repository made of the project's
dvc.yaml, params.yaml and kdas code, an edit of the ONNX exporter or of `kdas predict`'s help
leaves the teacher's training (and the synthetic data) up to date, while an edit of the
training command does not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import MLFLOW_QUIET, ROOT, TINY, dvc_project, tool_environ

MODEL_CODE = ("kdas/models/", "kdas/training/", "kdas/tracking/", "kdas/commands/", "kdas/export.py", "kdas/inference.py",
              "kdas/checkpoint.py", "kdas/losses.py")


def test_the_synth_stage_lists_no_model_tracking_or_export_code() -> None:
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["synth"]["deps"]
    assert "kdas/data/synth.py" in deps
    assert not [d for d in deps if d.startswith(MODEL_CODE) or d in ("kdas/models", "kdas/training", "kdas/tracking")], deps


@pytest.fixture
def project(tmp_path: Path, mlflow_template_db: Path) -> Path:
    """The project's DAG and code with the tiny profile, one epoch."""
    return dvc_project(tmp_path, mlflow_template_db, {**TINY, ("train", "epochs"): 1})


def dvc(project: Path, *args: str) -> str:
    env = {**tool_environ(), **MLFLOW_QUIET, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow' / 'mlflow.db'}",
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def changed(project: Path) -> set[str]:
    """The stages up to train_teacher that DVC would run again."""
    return set(json.loads(dvc(project, "status", "--json", "--with-deps", "train_teacher")))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path}: no {old!r} to edit"
    path.write_text(text.replace(old, new, 1))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_exporter_or_predict_help_edit_leaves_the_teacher_up_to_date(project: Path) -> None:
    dvc(project, "repro", "train_teacher")  # synth, manifest, validate, train_teacher: one epoch
    assert changed(project) == set()

    (project / "kdas" / "export.py").write_text((project / "kdas" / "export.py").read_text() + "# an edit of the exporter\n")
    edit(project / "kdas" / "commands" / "predict.py", "runs on onnxruntime, without PyTorch.", "runs on onnxruntime alone.")
    assert changed(project) == set()  # neither the teacher nor the synthetic data is stale

    # the same check sees an edit of code the stage runs: the reading above is no blind one
    path = project / "kdas" / "training" / "command.py"
    path.write_text(path.read_text() + "# an edit of the training command\n")
    assert changed(project) == {"train_teacher"}
