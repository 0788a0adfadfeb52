"""The documented schedule: `python -m pipelines.serve --cron ...` against a real `prefect
server start` registers the `retrain/weekly` deployment with its cron schedule, active, and
the workspace as its parameter (the ephemeral server refuses schedules: a real one is needed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ROOT, free_port, prefect_env, stop, wait_for_http

PREFECT = Path(sys.executable).parent / "prefect"
CRON = "0 3 * * 1"

pytestmark = pytest.mark.slow


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`prefect server start` on a free port (API only: no UI, no background services).
    Yields (api url, PREFECT_HOME); stops the server's whole process group afterwards."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--no-services"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=prefect_env(home), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        api = f"http://127.0.0.1:{port}/api"
        wait_for_http(f"{api}/health", proc, log, timeout=60)
        yield api, home
    finally:
        stop(proc)


def get_deployment(api: str, flow: str, name: str) -> dict | None:
    """The deployment `flow/name` from the REST API, or None while it does not exist."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{api}/deployments/name/{flow}/{name}", timeout=5) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


def test_serve_registers_weekly_cron_deployment(prefect_server: tuple[str, Path], tmp_path: Path) -> None:
    api, home = prefect_server
    workspace = tmp_path / "project"
    workspace.mkdir()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "pipelines.serve", "--cron", CRON, "--workspace", str(workspace)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=prefect_env(home, PREFECT_API_URL=api), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 45
        deployment = None
        while deployment is None:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no deployment retrain/weekly after 45 s:\n{log.read_text()[-3000:]}")
            deployment = get_deployment(api, "retrain", "weekly")
            if deployment is None:
                time.sleep(0.5)

        assert not deployment["paused"]
        schedules = deployment["schedules"]
        assert len(schedules) == 1, schedules
        assert schedules[0]["active"] is True
        assert schedules[0]["schedule"]["cron"] == CRON
        assert schedules[0]["schedule"]["timezone"] == "UTC"
        assert deployment["parameters"]["workspace"] == str(workspace.resolve())
        assert proc.poll() is None, "serve should keep running (serving the deployment)"
    finally:
        stop(proc)
