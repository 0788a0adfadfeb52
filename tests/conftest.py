"""Shared fixtures: real image files written by the tests, and paths to the shared data."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdas.config import load_params, serving_limits

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = SHARED / "datasets"
PARAMS = load_params(ROOT / "params.yaml")
# the importer's soft-mask limit, and what a served model enforces, as params.yaml sets them
MAX_NONBINARY = PARAMS.validation.max_nonbinary_fraction
SERVE = serving_limits(PARAMS.serve, PARAMS.validation.max_size)

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
# DVC keeps site-wide state and config outside the repository: isolate the test session's
_DVC_HOME = Path(tempfile.mkdtemp(prefix="kdas-tests-dvc-"))
for var in ("DVC_SITE_CACHE_DIR", "DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR"):
    os.environ[var] = str(_DVC_HOME / var.lower())
os.environ["DVC_NO_ANALYTICS"] = "1"
# Prefect: a private home (cached results would otherwise leak between runs), no telemetry
os.environ["PREFECT_HOME"] = str(_DVC_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"


def write_pair(images: Path, masks: Path, stem: str, *, size=(96, 80), img_ext=".png", mask_ext=".png", seed=0, fg=True, mode="RGB") -> tuple[Path, Path]:
    """A random image and a mask with an ellipse-ish square polyp, in the given formats."""
    rng = np.random.default_rng(seed)
    w, h = size
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    img_path = images / f"{stem}{img_ext}"
    img.save(img_path, **({"quality": 95} if img_ext == ".jpg" else {}))
    mask = np.zeros((h, w), np.uint8)
    if fg:
        mask[h // 4 : h // 2, w // 4 : w // 2] = 255
    mask_path = masks / f"{stem}{mask_ext}"
    Image.fromarray(mask).save(mask_path, **({"quality": 90} if mask_ext == ".jpg" else {}))
    return img_path, mask_path


def make_dataset(root: Path, n: int = 6, **kw) -> Path:
    """A plain images/ + masks/ dataset of n distinct pairs."""
    for i in range(n):
        write_pair(root / "images", root / "masks", f"img{i:02d}", seed=i, **kw)
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A project folder with params.yaml, as the cwd (kdas runs from the project root)."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tool_environ() -> dict[str, str]:
    """Environment for subprocesses: this interpreter's scripts (kdas, dvc) first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture
def tool_env() -> dict[str, str]:
    return tool_environ()


# --------------------------------------------------------------------------- MLflow stores and servers
# (mlflow is imported inside the fixtures: most tests never pay for it)

# no telemetry, and never a proxy between a test and its local server
MLFLOW_QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "NO_PROXY": "127.0.0.1,localhost"}


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated sqlite store: migrations take ~5 s, so once per session; copy it."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.getbasetemp() / "mlflow-template" / "mlflow.db"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(path.parent)  # a fresh store may create ./mlruns for its Default experiment
            MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def dvc_project(folder: Path, mlflow_template_db: Path, params: dict[tuple, object]) -> Path:
    """The project's dvc.yaml, params.yaml (with `params`, {key path: value}, set) and kdas code
    in `folder`, with its own MLflow store, in git + DVC: DVC hashes this copy of the code,
    the stages run the installed kdas."""
    import yaml

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, folder / name)
    shutil.copytree(ROOT / "kdas", folder / "kdas", ignore=shutil.ignore_patterns("__pycache__"))
    tree = yaml.safe_load((folder / "params.yaml").read_text())
    for path, value in params.items():
        node = tree
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    (folder / "mlflow").mkdir()
    shutil.copy(mlflow_template_db, folder / "mlflow" / "mlflow.db")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=folder, check=True, env=tool_environ())
    return folder


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_template_db: Path) -> Iterator[Path]:
    """tmp_path as the project (the cwd) with its own MLflow store: a copy of the migrated
    template in mlflow/mlflow.db, MLFLOW_TRACKING_URI on it (subprocesses inherit it), no
    kdas parent run or experiment from the environment, kdas's model cache in tmp_path/.cache.
    Yields the project folder. Combines with `workdir` (the same tmp_path)."""
    import mlflow

    from kdas.tracking.runs import PARENT_RUN_ENV
    from kdas.tracking.store import EXPERIMENT_ENV

    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir(exist_ok=True)
    shutil.copy(mlflow_template_db, db)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    for key, value in MLFLOW_QUIET.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.delenv(EXPERIMENT_ENV, raising=False)
    yield tmp_path
    while mlflow.active_run():  # never leak a run into the next test
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # forget this store (kdas.tracking sets the global URI)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll `url` until it answers 200; fail early, with `log`'s tail, if `proc` exits."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with opener.open(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session (``start_new_session=True``), workers included."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)  # anyone of the group left?
            except ProcessLookupError:
                return
            time.sleep(0.1)
