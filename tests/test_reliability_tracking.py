"""A tracking server that dies during training, against a real `mlflow server` on 127.0.0.1
stopped and started again on the same store: a warning per epoch and a bounded wait, the
training finishes, and what could not be logged is logged when the server returns or
named in one line at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from helpers import MLFLOW_QUIET, ROOT, free_port, stop, tool_environ, wait_for_http
from kdas.tracking.runs import BOUNDED_HTTP, PARENT_RUN_ENV, TrainingLog, stage_run
from kdas.tracking.store import EXPERIMENT_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

QUIET = {**MLFLOW_QUIET, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on root/mlflow.db (kept across restarts) at 127.0.0.1:port."""
    log = root / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, **QUIET}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_http(f"http://127.0.0.1:{port}/health", proc, log)
    return proc


@pytest.fixture
def store(tmp_path: Path, mlflow_template_db: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, int]]:
    """A server's store folder and port, the project (cwd) in tmp_path/project pointing at it."""
    root = tmp_path / "server"
    root.mkdir()
    shutil.copy(mlflow_template_db, root / "mlflow.db")
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    for key, value in QUIET.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.delenv(EXPERIMENT_ENV, raising=False)
    yield root, port
    mlflow.set_tracking_uri(None)  # forget this server (kdas.tracking sets the global URI): later tests must not reach for it


def test_epochs_logged_while_the_server_is_away_arrive_when_it_returns(store, monkeypatch, caplog):
    root, port = store
    for key, value in BOUNDED_HTTP.items():  # what a training command sets (bound_http_waits), for this test only
        monkeypatch.setenv(key, value)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    server = start_server(root, port)
    try:
        with stage_run("train_teacher") as run:
            epochs = TrainingLog()
            epochs({"train_loss": 1.0}, 1)
            stop(server)
            for step in (2, 3):
                start = time.monotonic()
                epochs({"train_loss": 1 / step}, step)
                assert time.monotonic() - start < 15
            warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
            assert [m.split(" (")[0] for m in warned] == ["MLflow did not take epoch 2", "MLflow did not take epoch 3"]
            assert all(m.endswith("kept, to be logged when it answers again") for m in warned)
            server = start_server(root, port)  # the same store at the same address
            epochs({"train_loss": 0.25}, 4)
            assert epochs.unlogged() is None
            stop(server)
            epochs({"best_val_meanDic": 0.5})
            (root.parent / "history.csv").write_text("epoch\n1\n")
            epochs.artifact(root.parent / "history.csv", "teacher")
            assert epochs.unlogged() == (f"MLflow run {run.info.run_id} in {uri} misses the final metrics, history.csv: its tracking "
                                         "store stopped answering (the training's own files hold every figure)")
        # ending the run with the server still away: a warning, not an error
        assert "could not be marked FINISHED" in caplog.records[-1].getMessage()
        server = start_server(root, port)
        client = MlflowClient(uri)
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.25)]
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
    finally:
        stop(server)


def test_kdas_train_outlives_its_tracking_server(store, tmp_path):
    root, port = store
    project = Path.cwd()
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["synth"].update(n_images=12, size=64)
    params["model"]["teacher"] = {"arch": "polyp_pvt_tiny", "backbone": None, "weights": "none", "drop_path_rate": 0.0}
    params["train"].update(image_size=64, epochs=6, workers=0, patience=10)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    from kdas.cli import main

    for args in (["data", "synth"], ["data", "manifest"]):
        assert CliRunner().invoke(main, args).exit_code == 0
    server = start_server(root, port)
    try:
        train = subprocess.Popen([sys.executable, "-m", "kdas", "train", "teacher"], cwd=project, env=tool_environ(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not (project / "models" / "teacher" / "last.ckpt").exists():  # the first epoch is done: the server dies
            assert train.poll() is None, train.communicate()
            time.sleep(0.05)
        stop(server)
        stdout, stderr = train.communicate(timeout=240)
    finally:
        stop(server)
    assert train.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "MLflow did not take epoch 6" in stderr and "MLflow did not take epoch 1 " not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("warning: MLflow run ") and "misses" in last and "epoch 6, the final metrics, history.csv" in last
    assert {"best.pt", "last.ckpt", "history.csv", "metrics.json"} <= {p.name for p in (project / "models" / "teacher").iterdir()}
    assert "best val meanDic" in stdout
