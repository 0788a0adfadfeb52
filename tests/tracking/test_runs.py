"""kdas.tracking runs against a real MLflow sqlite store in tmp_path (the `mlflow_store` fixture)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import ROOT, tool_environ
from kdas.promotion import metric_tags
from kdas.tracking.runs import PARENT_RUN_ENV, log_artifacts, log_data_lineage, log_dict, log_metrics, pipeline_run, stage_run
from kdas.tracking.store import EXPERIMENT_ENV, tracking_uri



def _client() -> MlflowClient:
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=kdas", "-c", "user.email=kdas@example.org", *args],
        cwd=cwd, capture_output=True, text=True, check=True,
    )
    return out.stdout.strip()


def _dvc_project(root: Path) -> dict[str, str]:
    """A real git + DVC project: `dvc add` a raw dataset, `dvc repro` a stage that derives
    data/processed from it. Returns the md5s DVC itself wrote (.dvc file and dvc.lock)."""
    env = tool_environ()
    run = lambda *cmd: subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True)  # noqa: E731
    (root / ".gitignore").write_text("/mlflow/\n")  # the store changes with every run
    _git(root, "init", "-q")
    run("dvc", "init", "-q")
    (root / "data" / "raw" / "synth").mkdir(parents=True)
    (root / "data" / "raw" / "synth" / "a.txt").write_text("frame a")
    run("dvc", "add", "data/raw/synth")
    (root / "dvc.yaml").write_text(
        "stages:\n"
        "  prepare:\n    cmd: mkdir -p data/processed/train && cp data/raw/synth/a.txt data/processed/train/\n"
        "    deps: [data/raw/synth]\n    outs: [data/processed]\n"
        "  train:\n    cmd: kdas train\n    deps: [data/processed/train]\n"
    )
    run("dvc", "repro", "prepare")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "init")
    raw = yaml.safe_load((root / "data" / "raw" / "synth.dvc").read_text())["outs"][0]["md5"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]["outs"][0]["md5"]
    return {"raw": raw, "processed": lock}


@pytest.mark.slow
def test_default_store_is_sqlite_in_the_project(mlflow_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri() == f"sqlite:///{mlflow_store.resolve()}/mlflow/mlflow.db"
    (mlflow_store / "report").mkdir()
    (mlflow_store / "report" / "report.txt").write_text("hello")
    with stage_run("evaluate") as run:
        log_artifacts(mlflow_store / "report", "reports")
        log_dict({"meanDic": 0.5}, "metrics.json")
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "kdas"
    assert experiment.artifact_location == (mlflow_store / "mlflow" / "artifacts").resolve().as_uri()
    artifacts = mlflow_store / "mlflow" / "artifacts" / run.info.run_id / "artifacts"
    assert (artifacts / "reports" / "report.txt").read_text() == "hello"
    assert (artifacts / "metrics.json").exists()
    assert not (mlflow_store / "mlruns").exists()


@pytest.mark.slow
def test_stage_run_nested_under_pipeline_run(mlflow_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EXPERIMENT_ENV, "kdas-test")
    md5 = _dvc_project(mlflow_store)
    commit = _git(mlflow_store, "rev-parse", "HEAD")

    params = {"train": {"lr": 1e-4, "multiscale": [0.75, 1.0]}, "distill": {"method": "kdas"}}
    with pipeline_run("weekly") as parent:
        assert os.environ[PARENT_RUN_ENV] == parent.info.run_id
        with stage_run("train", params) as child:
            with pytest.warns(UserWarning, match="val/loss"):
                logged = log_metrics({"val": {"dice": 0.8, "loss": float("nan")}}, step=3)
        # a stage run by `dvc repro` is a child process: it finds its parent in the environment
        code = "from kdas.tracking.runs import stage_run\nwith stage_run('evaluate') as r:\n    print(r.info.run_id)"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", code], cwd=mlflow_store, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        grandchild_id = proc.stdout.strip().splitlines()[-1]
    assert PARENT_RUN_ENV not in os.environ
    assert logged == {"val/dice": 0.8}

    client = _client()
    run = client.get_run(child.info.run_id)
    assert run.info.run_name == "train"
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_run(grandchild_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_experiment(run.info.experiment_id).name == "kdas-test"
    assert run.data.params == {"train.lr": "0.0001", "train.multiscale": "[0.75, 1.0]", "distill.method": "kdas"}
    assert run.data.metrics == {"val/dice": 0.8}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/dice")] == [3]
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == commit
    assert tags["kdas.git.dirty"] == "false"
    assert tags["sys.python"] and tags["sys.torch"] and tags["sys.platform"]
    assert tags["sys.cpu_count"] == str(os.cpu_count())
    assert "sys.cuda_device" in tags
    # lineage: the raw dataset, and the stage's dep found among the outs upstream in dvc.lock
    assert tags["dvc.raw.synth"] == md5["raw"] and md5["raw"].endswith(".dir")
    assert tags["dvc.dep.data/processed/train"] == md5["processed"]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_failing_stage_is_marked_failed(mlflow_store: Path) -> None:
    with pytest.raises(ValueError, match="bad batch"):
        with pipeline_run() as parent:
            with stage_run("train") as child:
                raise ValueError("bad batch")
    client = _client()
    run = client.get_run(child.info.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["kdas.error"] == "ValueError: bad batch"
    assert run.data.tags["mlflow.source.git.commit"] == "unknown"  # tmp_path is no git checkout
    assert client.get_run(parent.info.run_id).info.status == "FAILED"
    assert PARENT_RUN_ENV not in os.environ
    assert mlflow.active_run() is None


def test_log_metrics_skips_non_finite_and_needs_a_run(mlflow_store: Path) -> None:
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        log_metrics({"a": 1.0})
    with stage_run("evaluate") as run:
        with pytest.warns(UserWarning, match="not finite"):
            log_metrics({"a": 1, "b": float("inf"), "c": float("nan")})
        with pytest.warns(UserWarning, match="not a number"):
            log_metrics({"d": "n/a"})
        log_artifacts(_make_dir(mlflow_store), "plots")
    data = _client().get_run(run.info.run_id).data
    assert data.metrics == {"a": 1.0}
    assert [a.path for a in _client().list_artifacts(run.info.run_id, "plots")] == ["plots/grid.txt"]


def _make_dir(root: Path) -> Path:
    folder = root / "plots"
    folder.mkdir()
    (folder / "grid.txt").write_text("x")
    return folder


def test_metric_tags_average_over_test_sets() -> None:
    tags = metric_tags({"kvasir": {"meanDic": 0.9, "MAE": 0.03}, "cvc/meanDic": 0.7})
    assert float(tags["metric.meanDic"]) == pytest.approx(0.8)
    assert float(tags["metric.kvasir/MAE"]) == 0.03
    assert float(tags["metric.MAE"]) == 0.03
    # an explicit aggregate wins over the computed mean
    assert float(metric_tags({"a/meanDic": 0.2, "meanDic": 0.9})["metric.meanDic"]) == 0.9
    with pytest.warns(UserWarning):
        assert metric_tags({"a/meanDic": float("nan")}) == {}


def test_data_lineage_tolerates_missing_dvc_files(mlflow_store: Path) -> None:
    with stage_run("train"):
        assert log_data_lineage(["data/processed"], stage="train") == {}


@pytest.mark.slow
def test_an_unreachable_tracking_server_is_one_line_in_seconds(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**tool_environ(), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    model = tmp_path / "m.pt"
    from kdas.checkpoint import save_model
    from kdas.models import create_model

    save_model(model, create_model("polyp_pvt_tiny"), image_size=64)
    out = subprocess.run([sys.executable, "-m", "kdas", "predict", str(model), "--model", "models:/x@champion"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 1  # after a 5 s probe, not MLflow's minutes of retries
    assert f"http://127.0.0.1:{port} does not answer" in out.stderr and "Traceback" not in out.stderr
