"""A password in the tracking URI is never printed (issue 32, low 14: echoed 7 times in one
flow run, by MLflow's "View run ... at" links and kdas's own messages): a whole flow run and
the stage commands against a real `mlflow server` reached as http://user:secret@127.0.0.1,
and the messages of a store that does not answer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import MLFLOW_SERVER_QUIET, ROOT, TINY, dvc_project, free_port, start_mlflow_server, stop, tool_environ
from kdas.tracking.store import masked

SECRET = "s3cr3t-pw"


@pytest.fixture
def server(tmp_path: Path, mlflow_template_db: Path) -> Iterator[str]:
    """A real `mlflow server` (no auth of its own: it ignores the credentials), as a URI with a password."""
    root = tmp_path / "server"
    root.mkdir()
    shutil.copy(mlflow_template_db, root / "mlflow.db")
    port = free_port()
    proc = start_mlflow_server(root, port)
    try:
        yield f"http://kdas:{SECRET}@127.0.0.1:{port}"
    finally:
        stop(proc)


def test_masked_hides_the_password_of_every_uri_form() -> None:
    assert masked("postgresql://user:secret@127.0.0.1/db") == "postgresql://user:***@127.0.0.1/db"
    assert masked("http://user:secret@127.0.0.1:5000") == "http://user:***@127.0.0.1:5000"
    assert masked("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    # inside a message, as MLflow's own errors name the URL they called
    text = "API request to http://user:secret@127.0.0.1:5000/api/2.0/mlflow/runs/get failed: a: b@c"
    assert masked(text) == "API request to http://user:***@127.0.0.1:5000/api/2.0/mlflow/runs/get failed: a: b@c"


def test_an_unreachable_server_is_named_without_its_password(workdir: Path) -> None:
    uri = f"http://kdas:{SECRET}@127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "-m", "kdas", "promote", "--role", "student", "--version", "1"], cwd=workdir,
                            env={**tool_environ(), **MLFLOW_SERVER_QUIET, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "does not answer" in result.stderr and "kdas:***@127.0.0.1" in result.stderr, result.stderr
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.slow
def test_the_registry_names_its_store_without_the_password(server: str, workdir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "kdas", "promote", "--role", "student", "--version", "1"], cwd=workdir,
                            env={**tool_environ(), **MLFLOW_SERVER_QUIET, "MLFLOW_TRACKING_URI": server}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "no registered model 'kdas-student' in http://kdas:***@" in result.stderr, result.stderr
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_flow_run_never_prints_the_password(server: str, tmp_path: Path, mlflow_template_db: Path) -> None:
    (tmp_path / "project").mkdir()
    project = dvc_project(tmp_path / "project", mlflow_template_db, TINY)
    flow = subprocess.run([sys.executable, "-m", "pipelines.retrain", "--workspace", str(project)], cwd=ROOT,
                          env={**tool_environ(), **MLFLOW_SERVER_QUIET, "MLFLOW_TRACKING_URI": server}, capture_output=True, text=True,
                          timeout=540)
    output = flow.stdout + flow.stderr
    assert flow.returncode == 0, output[-4000:]
    assert "kdas-student version 1: promoted" in output, output[-3000:]
    assert SECRET not in output, [line for line in output.splitlines() if SECRET in line]
