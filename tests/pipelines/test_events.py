"""New data starts the flow: against a real `prefect server start` on loopback (with its event
and automation services), prefect.yaml's `on-new-data` deployment, deployed as documented,
and a process-pool worker, a burst of three `kdas data import`s in a tiny project emits three
kdas.data.changed events and starts one flow run, in that project, which completes. Without a
Prefect API the import works and says how to turn the trigger on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import ROOT, TINY, dvc_project, free_port, make_dataset, prefect_env, stop, wait_for_http

PREFECT = Path(sys.executable).parent / "prefect"
POOL = "kdas-process"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

pytestmark = pytest.mark.slow


def api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{url}{path}", method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with OPENER.open(request, timeout=30) as resp:
        return json.load(resp)


def run(cmd: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_import_without_a_prefect_api_says_how_to_turn_the_trigger_on(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = prefect_env(tmp_path / "prefect-home")
    done = run([sys.executable, "-m", "kdas", "data", "import", make_dataset(tmp_path / "new"), "--name", "new", "--no-dvc"], project, env)
    assert "data/raw/new: 6 image/mask pairs (6 new)" in done.stdout
    assert "kdas.data.changed was not sent: set PREFECT_API_URL" in done.stdout and "on-new-data" in done.stdout


@pytest.mark.timeout(900)
def test_a_burst_of_imports_starts_one_flow_run_that_completes(tmp_path, mlflow_template_db):
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "server.log"
    # the event services (event persister, triggers, actions) turn the events into a flow run
    with log.open("w") as out:
        server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"], cwd=tmp_path,
                                  env=prefect_env(home, PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false"), stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        wait_for_http(f"{url}/health", server, log, timeout=90)
        env = prefect_env(home, PREFECT_API_URL=url, KDAS_WORKSPACE=str(ROOT), MLFLOW_DISABLE_TELEMETRY="true")
        (tmp_path / "project").mkdir()
        project = dvc_project(tmp_path / "project", mlflow_template_db, {**TINY, ("data", "datasets"): ["synth", "new-a", "new-b", "new-c"]})
        run(["git", "add", "-A"], project, env)
        run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"], project, env)
        run([PREFECT, "work-pool", "create", POOL, "--type", "process"], ROOT, env)
        run([PREFECT, "--no-prompt", "deploy", "-n", "on-new-data"], ROOT, env)
        deployment = api(url, "/deployments/name/retrain/on-new-data")
        automations = api(url, "/automations/filter", {})
        assert [a["trigger"]["expect"] for a in automations] == [["kdas.data.changed"]]

        started = time.monotonic()
        for i, name in enumerate(("new-a", "new-b", "new-c")):  # a burst: three datasets land within seconds
            done = run([sys.executable, "-m", "kdas", "data", "import", make_dataset(tmp_path / name, size=(96 + 8 * i, 80)), "--name", name],
                       project, env)
            assert f"data/raw/{name}: 6 image/mask pairs (6 new)" in done.stdout and "not sent" not in done.stdout
        imported = time.monotonic()
        deadline = time.monotonic() + 60  # the server stores events in batches
        while len(events := api(url, "/events/filter", {"filter": {"event": {"name": ["kdas.data.changed"]}}})["events"]) < 3:
            assert time.monotonic() < deadline, f"{len(events)} events stored:\n{log.read_text()[-2000:]}"
            time.sleep(1)
        assert sorted(e["resource"]["prefect.resource.id"] for e in events) == ["kdas.dataset.new-a", "kdas.dataset.new-b", "kdas.dataset.new-c"]
        assert {e["payload"]["new_pairs"] for e in events} == {6} and all(e["payload"]["dvc_md5"].endswith(".dir") for e in events)

        worker_log = tmp_path / "worker.log"
        with worker_log.open("w") as out:
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL], cwd=ROOT, env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while True:
            runs = api(url, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})
            if runs and runs[0]["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.monotonic() < deadline, f"no finished flow run after 600 s:\n{worker_log.read_text()[-4000:]}\n{log.read_text()[-2000:]}"
            time.sleep(2)
        time.sleep(25)  # past the debounce window: no second run comes
        runs = api(url, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})
        assert len(runs) == 1, [r["state"]["type"] for r in runs]
        (flow_run,) = runs
        assert flow_run["state"]["type"] == "COMPLETED", worker_log.read_text()[-4000:]
        assert flow_run["parameters"]["workspace"] == str(project.resolve())  # the project that imported the data
        first = min(datetime.fromisoformat(e["occurred"]) for e in events)
        delay = (datetime.fromisoformat(flow_run["start_time"]) - first).total_seconds()
        print(f"3 imports in {imported - started:.1f} s; the flow run started {delay:.1f} s after the first event "
              f"(the trigger's schedule_after: 20 s), ran {flow_run['total_run_time']:.0f} s")
        assert delay < 45
        manifest = pd.read_parquet(project / "data" / "manifest.parquet")
        assert set(manifest["dataset"]) == {"synth", "new-a", "new-b", "new-c"}  # every import of the burst is in the run
    finally:
        if worker is not None:
            stop(worker)
        stop(server)


def test_trigger_window_and_delay_agree():
    """The debounce is sound only if the run starts when the window closes: an event the window
    swallowed is then in the run, and one after it starts the next run."""
    (deployment,) = [d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"] if d["name"] == "on-new-data"]
    (trigger,) = deployment["triggers"]
    assert trigger["within"] == trigger["schedule_after"] > 0 and deployment["concurrency_limit"]["limit"] == 1
