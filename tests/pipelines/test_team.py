"""Team mode, for real: one team stack for this module's tests (pipelines.stack: PostgreSQL, moto's
S3, the MLflow server on PostgreSQL with proxied artifacts, the Prefect server on PostgreSQL,
all on 127.0.0.1), two clones of the project with the tiny profile, the `weekly` deployment
of prefect.yaml run by a real process-pool worker. Clients hold no AWS variables."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import MLFLOW_QUIET, ROOT, TINY, set_key, stop, tool_environ
from pipelines.stack import BUCKET, S3_KEY_ID, S3_REGION, S3_SECRET, TeamStack

pytestmark = [pytest.mark.team, pytest.mark.slow, pytest.mark.timeout(900)]

PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "kdas-process"  # prefect.yaml's `weekly` deployment
NAMES = ("kdas-teacher", "kdas-student")
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def stack() -> Iterator[TeamStack]:
    with TeamStack() as team:
        yield team


@pytest.fixture(scope="module")
def env(stack: TeamStack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A client's environment: the stack's two URLs, a private Prefect home, no AWS variables."""
    base = {k: v for k, v in tool_environ().items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
    return {**base, **MLFLOW_QUIET, **stack.env, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache")),
            "KDAS_WORKSPACE": str(ROOT)}  # where workers find the flow's code (prefect.yaml's pull step)


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def api(stack: TeamStack, path: str, body: dict | None = None) -> dict | list:
    request = urllib.request.Request(f"{stack.prefect_api}{path}", method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with OPENER.open(request, timeout=30) as resp:
        return json.load(resp)


def make_clone(root: Path, seed: int, stack: TeamStack, env: dict[str, str]) -> Path:
    """A git + DVC clone of the project, tiny profile, its own seeds, the stack's S3 remote."""
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "kdas", root / "kdas", ignore=shutil.ignore_patterns("__pycache__"))  # stage deps hash it
    params = yaml.safe_load((root / "params.yaml").read_text())
    for path, value in {**TINY, ("train", "seed"): seed, ("distill", "seed"): seed}.items():
        set_key(params, path, value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    remote = stack.dvc_remote
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "remote", "add", "-d", "team", remote["url"]],
                ["dvc", "remote", "modify", "team", "endpointurl", remote["endpointurl"]],
                ["dvc", "remote", "modify", "--local", "team", "access_key_id", remote["access_key_id"]],
                ["dvc", "remote", "modify", "--local", "team", "secret_access_key", remote["secret_access_key"]],
                ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"]):
        run(cmd, root, env)
    return root


def create_run(stack: TeamStack, workspace: Path) -> str:
    deployment = api(stack, "/deployments/name/retrain/weekly")
    return api(stack, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"workspace": str(workspace)}})["id"]


def start_worker(env: dict[str, str], log: Path, limit: int, *options: str, **extra: str) -> subprocess.Popen:
    """A process-pool worker that asks for work every second (Prefect's default: every 10 s)."""
    with log.open("w") as out:
        return subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--limit", str(limit), *options], cwd=ROOT,
                                env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1", **extra}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_final(stack: TeamStack, run_ids: list[str], worker: subprocess.Popen, log: Path, timeout: float = 600) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        runs = {i: api(stack, f"/flow_runs/{i}") for i in run_ids}
        if all(r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs.values()):
            return runs
        assert time.monotonic() < deadline, f"flow runs not final after {timeout} s:\n{log.read_text()[-4000:]}"
        time.sleep(2)


def registry(env: dict[str, str], name: str) -> tuple[list[str], dict[str, str]]:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    versions = sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int)
    return versions, {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def bucket_keys(stack: TeamStack, prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=stack.s3.url, aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET,
                      region_name=S3_REGION)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def concurrent(stack: TeamStack, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The `weekly` deployment from prefect.yaml, two flow runs at once in two clones, one
    process-pool worker with --limit 2 running both."""
    root = tmp_path_factory.mktemp("team")
    clones = [make_clone(root / name, seed, stack, env) for name, seed in (("a", 0), ("b", 1))]
    for pool in (POOL, "kdas-gpu"):
        run([PREFECT, "work-pool", "create", pool, "--type", "process"], ROOT, env)
    for name in NAMES:  # the registry locks, made with the pools (a flow makes one that is missing)
        run([PREFECT, "gcl", "create", f"kdas-registry-{name}", "--limit", "1"], ROOT, env)
    run([PREFECT, "--no-prompt", "deploy", "--all"], ROOT, env)
    ids = [create_run(stack, clone) for clone in clones]
    log = root / "worker.log"
    started = time.monotonic()
    worker = start_worker(env, log, 2, "--run-once")
    try:
        runs = wait_final(stack, ids, worker, log)
        worker.wait(120)
    finally:
        stop(worker)
    return {"clones": clones, "runs": [runs[i] for i in ids], "log": log.read_text(), "seconds": time.monotonic() - started}


def test_prefect_yaml_deploys_both_pools(concurrent: dict, stack: TeamStack) -> None:
    for name, pool, cron in (("weekly", POOL, "0 3 * * 1"), ("weekly-gpu", "kdas-gpu", "0 2 * * 0")):
        deployment = api(stack, f"/deployments/name/retrain/{name}")
        assert deployment["work_pool_name"] == pool and deployment["schedules"][0]["schedule"]["cron"] == cron
        # `prefect deploy` resolves {{ $KDAS_WORKSPACE }} when it runs: the workers' clone path
        assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(ROOT)


def test_two_flow_runs_at_once_complete_on_one_worker_with_their_parent_runs(concurrent: dict, env: dict[str, str]) -> None:
    assert [r["state"]["type"] for r in concurrent["runs"]] == ["COMPLETED", "COMPLETED"], concurrent["log"][-4000:]
    runs = concurrent["runs"]
    # both ran at the same time on the one worker
    assert max(r["start_time"] for r in runs) < min(r["end_time"] for r in runs)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("kdas")
    parents = {r.info.run_id for r in client.search_runs([experiment.experiment_id], "attributes.run_name = 'retrain'")}
    assert len(parents) == 2
    for name in NAMES:  # each version's training run nests under one of the two flow runs' parent runs
        for version in client.search_model_versions(f"name='{name}'"):
            assert client.get_run(version.run_id).data.tags["mlflow.parentRunId"] in parents


def test_concurrent_registrations_each_promote_their_own_version(concurrent: dict, env: dict[str, str], stack: TeamStack) -> None:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for role, name in zip(("teacher", "student"), NAMES):
        versions, aliases = registry(env, name)
        assert versions == ["1", "2"]  # distinct, contiguous
        registered = [json.loads((c / "reports" / "register" / f"{role}.json").read_text())["version"] for c in concurrent["clones"]]
        assert sorted(registered) == ["1", "2"]
        decisions = {}
        for clone, version in zip(concurrent["clones"], registered):
            decision = json.loads((clone / "reports" / "promotion" / f"{role}.json").read_text())
            assert decision["challenger"] == version  # the version this run registered, whatever the alias said
            tags = client.get_model_version(name, version).tags
            assert tags["promotion.decision"] == ("promoted" if decision["promoted"] else "rejected")
            decisions[version] = tags
        # serialised: the first decided with no champion, the second against the first's outcome
        first, second = sorted(decisions, key=lambda v: decisions[v]["promotion.time"])
        assert decisions[first]["promotion.champion_before"] == "None" and decisions[first]["promotion.decision"] == "promoted"
        assert decisions[second]["promotion.champion_before"] == first
        champion = second if decisions[second]["promotion.decision"] == "promoted" else first
        assert aliases["champion"] == champion
        limit = api(stack, f"/v2/concurrency_limits/kdas-registry-{name}")
        assert limit["limit"] == 1 and limit["active_slots"] == 0
    # the applications' logs (PostgreSQL's own logs each unique violation the servers handle)
    logs = {"worker": concurrent["log"], **{f: (stack.logs / f).read_text() for f in ("mlflow.log", "prefect.log")}}
    found = {name: [line for line in text.splitlines() if re.search(r"IntegrityError|database is locked|deadlock", line)]
             for name, text in logs.items()}
    assert not any(found.values()), {name: lines[:5] for name, lines in found.items()}
    assert concurrent["log"].count("registry lock kdas-registry-kdas-student held") == 2


CHAMPION_PREDICTS = textwrap.dedent("""\
    import base64, io, json, sys
    import mlflow, pandas as pd
    from PIL import Image
    model = mlflow.pyfunc.load_model(sys.argv[1])
    buf = io.BytesIO()
    Image.new("RGB", (70, 50), (200, 80, 60)).save(buf, "PNG")
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]}))
    with Image.open(io.BytesIO(base64.b64decode(out["mask"][0]))) as mask:
        print(json.dumps({"size": mask.size}))
""")


def test_the_registry_goes_through_the_server_to_the_bucket_and_survives_a_restart(
        concurrent: dict, env: dict[str, str], stack: TeamStack, tmp_path: Path) -> None:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("kdas-student", "champion")
    assert client.get_model_version_download_uri("kdas-student", champion.version).startswith("mlflow-artifacts:")
    assert client.get_experiment_by_name("kdas").artifact_location.startswith("mlflow-artifacts:")
    keys = bucket_keys(stack, "mlflow/")
    assert any(k.endswith("/artifacts/best.pt") for k in keys) and any(k.endswith("/MLmodel") for k in keys)
    assert not any(k.startswith("AWS_") for k in env)
    out = run([sys.executable, "-c", CHAMPION_PREDICTS, "models:/kdas-student@champion"], tmp_path, env, timeout=240)
    assert json.loads(out.strip().splitlines()[-1]) == {"size": [70, 50]}

    before = {name: registry(env, name) for name in NAMES}
    stack.mlflow.stop()
    stack.mlflow.start()
    stack.mlflow.wait_ready()
    assert {name: registry(env, name) for name in NAMES} == before


def test_dvc_push_then_pull_from_the_s3_remote(concurrent: dict, env: dict[str, str], stack: TeamStack) -> None:
    clone = concurrent["clones"][0]
    run(["dvc", "push", "--run-cache"], clone, env)
    assert bucket_keys(stack, "dvc/")
    student = clone / "models" / "student" / "best.pt"
    content = student.read_bytes()
    shutil.rmtree(clone / ".dvc" / "cache")
    for output in (student, clone / "models" / "teacher" / "best.pt", clone / "data" / "manifest.parquet"):
        output.unlink()
    shutil.rmtree(clone / "data" / "raw" / "synth")
    run(["dvc", "pull", "--run-cache"], clone, env)
    assert student.read_bytes() == content
    assert "Cache and remote 'team' are in sync" in run(["dvc", "status", "-c"], clone, env)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env)


def test_s3_stopped_in_the_middle_of_a_flow_then_back(concurrent: dict, env: dict[str, str], stack: TeamStack, tmp_path: Path) -> None:
    clone = concurrent["clones"][1]
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["distill"]["seed"] = 7  # a new student: distill, evaluate and register it again
    params["register"].update(retries=1, retry_delay=1)  # one retry, not two 10 s apart: the fault outlasts both
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = {name: registry(env, name) for name in NAMES}
    log = tmp_path / "worker.log"
    # MLflow's client retries a failing server for minutes by default: a fault test needs seconds
    worker = start_worker(env, log, 1, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    try:
        run_id = create_run(stack, clone)
        deadline = time.monotonic() + 400
        while not any(p.cmdline()[-3:] == ["register", "--role", "student"] for p in _descendants(worker)):
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        stack.s3.stop()  # while the student registers, its files on their way to the bucket
        try:
            failed = wait_final(stack, [run_id], worker, log)[run_id]
        finally:
            stack.s3.start()
        assert failed["state"]["type"] in ("FAILED", "CRASHED"), log.read_text()[-4000:]
        assert log.read_text().count("Retry 1/1 will start 1.0 second(s) from now") == 1  # params.yaml's retries, then no more
        message = failed["state"]["message"]
        assert len([line for line in message.splitlines() if line.startswith("error: ")]) == 1, message
        assert "Traceback" not in message
        # no student version, no student alias moved; the teacher: no new version. (Its aliases may
        # move: this run's teacher stage is cached, and it promotes the version it registered before,
        # which the concurrent runs may have left behind the other clone's identical one.)
        assert registry(env, "kdas-student") == before["kdas-student"]
        assert registry(env, "kdas-teacher")[0] == before["kdas-teacher"][0]

        again = create_run(stack, clone)  # the service is back: a rerun
        rerun = wait_final(stack, [again], worker, log)[again]
    finally:
        stop(worker)
    assert rerun["state"]["type"] == "COMPLETED", log.read_text()[-4000:]
    versions, aliases = registry(env, "kdas-student")
    assert versions == before["kdas-student"][0] + ["3"]  # one new version, no duplicate
    assert registry(env, "kdas-teacher")[0] == before["kdas-teacher"][0]
    assert json.loads((clone / "reports" / "promotion" / "student.json").read_text())["challenger"] == "3"


def _descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            child.cmdline()
            found.append(child)
        except psutil.Error:
            pass
    return found


def test_the_stack_command_prints_what_to_export_and_stops_everything(env: dict[str, str], tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.stack"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line.rstrip())
            if line.startswith("Ctrl-C"):
                break
        text = "\n".join(lines)
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", text, re.M))
        assert set(exports) == {"MLFLOW_TRACKING_URI", "PREFECT_API_URL"}, text
        for url in (f"{exports['MLFLOW_TRACKING_URI']}/health", f"{exports['PREFECT_API_URL']}/health"):
            with OPENER.open(url, timeout=10) as resp:
                assert resp.status == 200
        assert "dvc remote modify team endpointurl http://127.0.0.1:" in text
        root = Path(re.search(r"data and logs in (\S+)\):", text)[1])
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 3  # postgres (and its workers), mlflow, prefect
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "team stack stopped" in proc.stdout.read()  # type: ignore[union-attr]
    finally:
        stop(proc)
    for child in tree:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, child
    assert not root.exists()
