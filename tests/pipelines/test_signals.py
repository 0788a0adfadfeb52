"""SIGTERM to the real flow (`python -m pipelines.retrain`) while `kdas train teacher` runs
under it: Prefect's engine handles SIGTERM itself during a flow run, and the stage must stop
all the same (issue 23): nothing left running, DVC's lock free, the training run ended."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from helpers import MLFLOW_QUIET, ROOT, TINY, dvc_project, tool_environ

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def project(tmp_path: Path, mlflow_template_db: Path) -> Path:
    """The project's DAG and code with the tiny profile, training long enough to be stopped."""
    return dvc_project(tmp_path, mlflow_template_db, {**TINY, ("train", "epochs"): 500})


def training(flow: psutil.Process) -> psutil.Process | None:
    for proc in flow.children(recursive=True):
        try:
            if proc.cmdline()[-3:] == ["kdas", "train", "teacher"] or proc.cmdline()[-2:] == ["train", "teacher"]:
                return proc
        except psutil.Error:
            pass
    return None


def test_sigterm_to_the_flow_stops_its_running_stage(project: Path) -> None:
    env = {**tool_environ(), **MLFLOW_QUIET, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"}
    log = project / "flow.log"
    with log.open("w") as out:
        flow = subprocess.Popen([sys.executable, "-m", "pipelines.retrain", "--workspace", str(project)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 200
        stage = None
        while stage is None:
            assert flow.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            stage = training(psutil.Process(flow.pid))
            time.sleep(0.2)
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        while not train_runs(client):  # into its epochs, its MLflow run open
            assert flow.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        tree = psutil.Process(flow.pid).children(recursive=True)
        started = time.monotonic()
        flow.send_signal(signal.SIGTERM)
        code = flow.wait(60)
    finally:
        if flow.poll() is None:
            flow.kill()
    assert code != 0 and time.monotonic() - started < 45, log.read_text()[-3000:]
    for proc in tree:  # dvc, the training and all they started: gone (or an exited zombie)
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, proc
    # the stage never finished: no report (a best.pt of a finished epoch may stay, like last.ckpt, for --resume),
    # and DVC recorded nothing
    assert not (project / "models" / "teacher" / "metrics.json").exists()
    assert "train_teacher" not in ((project / "dvc.lock").read_text() if (project / "dvc.lock").exists() else "")
    again = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", "synth"], cwd=project, env=tool_environ(),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr  # DVC's lock is free
    assert [r.info.status for r in train_runs(client)] in (["KILLED"], ["FAILED"])


def train_runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "attributes.run_name = 'train_teacher'") if experiments else []
