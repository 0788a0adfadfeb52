"""Signals to the retrain flow reach its running stage and are waited for. SIGTERM to the real
flow (`python -m pipelines.retrain`) while `kdas train teacher` runs under it: Prefect's engine
handles SIGTERM itself during a flow run, and the stage must stop all the same (issue 23):
nothing left running, DVC's lock free, the training run ended. SIGTERM/SIGINT to the stage
task alone (a real `dvc repro` and the command it runs): the same. SIGKILL to the flow: what it
started dies with it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from helpers import MLFLOW_QUIET, ROOT, TINY, dvc_project, tool_environ

pytestmark = pytest.mark.slow


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


def start_flow(project: Path) -> tuple[subprocess.Popen, Path]:
    """`python -m pipelines.retrain` on `project`, its output in project/flow.log."""
    env = {**tool_environ(), **MLFLOW_QUIET, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"}
    log = project / "flow.log"
    with log.open("w") as out:
        flow = subprocess.Popen([sys.executable, "-m", "pipelines.retrain", "--workspace", str(project)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    return flow, log


@pytest.mark.timeout(300)
def test_sigterm_to_the_flow_stops_its_running_stage(project: Path) -> None:
    flow, log = start_flow(project)
    try:
        deadline = time.monotonic() + 200
        stage = None
        while stage is None:
            assert flow.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            stage = training(psutil.Process(flow.pid))
            time.sleep(0.2)
        client = MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
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


@pytest.mark.timeout(300)
def test_what_a_sigkilled_flow_started_dies_with_it(project: Path) -> None:
    """A SIGKILL runs no code of the flow's: its watcher stops the stage (dvc, the training) and
    Prefect's temporary server in its place (issue 32, low 4: they went on, and DVC committed the stage)."""
    flow, log = start_flow(project)
    try:
        deadline = time.monotonic() + 200
        while training(psutil.Process(flow.pid)) is None:
            assert flow.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        client = MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
        while not train_runs(client):  # into its epochs, its MLflow run open (and the watcher has seen it)
            assert flow.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        tree = psutil.Process(flow.pid).children(recursive=True)
        assert any("prefect.server.api.server:create_app" in " ".join(p.cmdline()) for p in tree if running(p))  # the temporary server
        flow.kill()
        flow.wait(10)
        started = time.monotonic()
        _, alive = psutil.wait_procs(tree, timeout=60)
    finally:
        if flow.poll() is None:
            flow.kill()
    alive = [p for p in alive if running(p)]
    for p in alive:  # never leave them to the next test
        p.kill()
    assert not alive, alive
    assert time.monotonic() - started < 45
    assert "train_teacher" not in ((project / "dvc.lock").read_text() if (project / "dvc.lock").exists() else "")
    assert [r.info.status for r in train_runs(client)] in (["KILLED"], ["FAILED"])  # the training stopped as on SIGTERM
    again = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", "synth"], cwd=project, env=tool_environ(),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr  # DVC's lock is free


def running(proc: psutil.Process) -> bool:
    """Alive, not an exited zombie (where nothing reaps orphans)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def train_runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "attributes.run_name = 'train_teacher'") if experiments else []


# --------------------------------------------------------------------------- the flow's stage task alone, outside a Prefect server


STAGE = """\
stages:
  slow:
    cmd: {cmd}
    outs:
      - out.txt
"""
SLOW = """python -c "import os, time; open('stage.pid', 'w').write(str(os.getpid())); time.sleep(120); open('out.txt', 'w').write('slow')\""""
FAST = """python -c "open('out.txt', 'w').write('fast')\""""

# The flow's task body, outside a Prefect server (disable_run_logger: Prefect's way to call task.fn directly)
DRIVER = textwrap.dedent("""\
    import sys
    from pathlib import Path
    from prefect.logging import disable_run_logger
    from pipelines.retrain import forwarding_signals, run_stage
    with forwarding_signals(), disable_run_logger():
        run_stage.fn("slow", Path(sys.argv[1]))
""")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    env = tool_environ()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "dvc.yaml").write_text(STAGE.format(cmd=SLOW))
    return tmp_path


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_running_stage_and_frees_dvcs_lock(workspace: Path, sig: int) -> None:
    env = {**tool_environ(), "PYTHONPATH": str(ROOT)}
    flow = subprocess.Popen([sys.executable, "-c", DRIVER, str(workspace)], env=env, cwd=ROOT)
    pid_file = workspace / "stage.pid"
    deadline = time.monotonic() + 90
    while not pid_file.exists() or not pid_file.read_text():
        assert flow.poll() is None and time.monotonic() < deadline, "the stage never started"
        time.sleep(0.1)
    stage = psutil.Process(int(pid_file.read_text()))
    dvc = psutil.Process(flow.pid).children()[0]
    start = time.monotonic()
    flow.send_signal(sig)
    # SIGTERM: SystemExit(143); SIGINT: KeyboardInterrupt, which Python ends by dying of SIGINT
    assert flow.wait(60) == (-signal.SIGINT if sig == signal.SIGINT else 128 + sig)
    assert time.monotonic() - start < 30
    for proc in (dvc, stage):  # gone (or an exited zombie where nothing reaps orphans)
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    assert not (workspace / "out.txt").exists()
    # the next run is not refused on DVC's lock
    (workspace / "dvc.yaml").write_text(STAGE.format(cmd=FAST))
    again = subprocess.run([sys.executable, "-m", "dvc", "repro", "slow"], cwd=workspace, env=tool_environ(),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (workspace / "out.txt").read_text() == "fast"
