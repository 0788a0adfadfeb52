"""SIGTERM/SIGINT to the retrain flow reach its running stage (a real `dvc repro` and the
command it runs) and are waited for: nothing is left running and DVC's lock is free."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, tool_environ

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

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
