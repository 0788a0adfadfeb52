"""Faults around `kdas train`: SIGTERM ends its MLflow run KILLED (not RUNNING forever), and
a lock per output folder stops a second training (or one beside an orphan of a killed
`dvc repro`) writing into the same folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from click.testing import CliRunner

from helpers import ROOT, tool_environ
from kdas.io import FolderBusyError, folder_lock

HOLDER = textwrap.dedent("""\
    import sys, time
    from kdas.io import folder_lock
    with folder_lock(sys.argv[1], "a test holder"):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_folder_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusyError) as busy, folder_lock(tmp_path / "out", "a second writer"):
            pass
        assert str(busy.value) == (f"{tmp_path / 'out'}: pid {holder.pid} (a test holder) is writing into it; wait for it to end "
                                   "or stop it, or write elsewhere (--out)")
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup ran: the OS releases the lock
        holder.wait(30)
    with folder_lock(tmp_path / "out", "the next writer"):
        assert (tmp_path / "out" / ".kdas.lock").read_text() == f"pid {os.getpid()} (the next writer)\n"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_ends_the_run_killed_and_a_second_training_into_the_folder_is_refused(workdir, mlflow_store):
    from mlflow.tracking import MlflowClient

    from kdas.cli import main

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["data"]["synth"].update(n_images=12, size=64)
    params["model"]["teacher"] = {"arch": "polyp_pvt_tiny", "backbone": None, "weights": "none", "drop_path_rate": 0.0}
    params["train"].update(image_size=64, epochs=200, patience=500, workers=0)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["data", "synth"], ["data", "manifest"]):
        assert CliRunner().invoke(main, args).exit_code == 0
    first = subprocess.Popen([sys.executable, "-m", "kdas", "train", "teacher"], cwd=workdir, env=tool_environ(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (workdir / "models" / "teacher" / "last.ckpt").exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "kdas", "train", "teacher"], cwd=workdir, env=tool_environ(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert second.stderr.strip() == (f"error: models/teacher: pid {first.pid} (kdas train teacher) is writing into it; wait for it "
                                         "to end or stop it, or write elsewhere (--out)")
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 128 + signal.SIGTERM
    finally:
        if first.poll() is None:
            first.kill()
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("train_teacher", "KILLED")]  # the refused one made no run
    with folder_lock(workdir / "models" / "teacher", "the next training"):
        pass
    assert (workdir / "models" / "teacher" / "last.ckpt").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_training_whose_dvc_repro_is_killed_stops_instead_of_running_on_as_an_orphan(workdir, mlflow_store):
    import psutil
    from mlflow.tracking import MlflowClient

    from kdas.cli import main

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["data"]["synth"].update(n_images=12, size=64)
    params["model"]["teacher"] = {"arch": "polyp_pvt_tiny", "backbone": None, "weights": "none", "drop_path_rate": 0.0}
    params["train"].update(image_size=64, epochs=200, patience=500, workers=0)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["data", "synth"], ["data", "manifest"]):
        assert CliRunner().invoke(main, args).exit_code == 0
    (workdir / "dvc.yaml").write_text("stages:\n  train_teacher:\n    cmd: kdas train teacher\n    outs:\n      - models/teacher/best.pt\n")
    subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=workdir, check=True, env=tool_environ())
    dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train_teacher"], cwd=workdir, env=tool_environ(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (workdir / "models" / "teacher" / "last.ckpt").exists():
            assert dvc.poll() is None, "dvc repro ended before training"
            time.sleep(0.05)
        [training] = [p for p in psutil.Process(dvc.pid).children(recursive=True) if "train" in p.cmdline()]
        dvc.kill()  # SIGKILL: dvc runs no cleanup, and nothing forwards it to the stage
        dvc.wait(30)
        training.wait(30)  # stopped by its own watch (psutil cannot see a grandchild's status: its run below can)
    finally:
        for proc in psutil.Process().children(recursive=True):
            if "train" in proc.cmdline():
                proc.kill()
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("train_teacher", "KILLED")]
    with folder_lock(workdir / "models" / "teacher", "the next training"):
        pass
