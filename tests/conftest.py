"""Fixtures for every folder under tests/, and the test session's isolation (DVC's and
Prefect's homes, no telemetry). Shared plain helpers and constants are in helpers.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import MLFLOW_QUIET, ROOT, tool_environ

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
# one thread a process: the models are tiny, and pytest-xdist's workers (pyproject.toml's addopts)
# and the stages they start share the cores; two OpenMP threads each would time-slice to a crawl
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DVC keeps site-wide state and config outside the repository: isolate the test session's
_DVC_HOME = Path(tempfile.mkdtemp(prefix="kdas-tests-dvc-"))
for var in ("DVC_SITE_CACHE_DIR", "DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR"):
    os.environ[var] = str(_DVC_HOME / var.lower())
os.environ["DVC_NO_ANALYTICS"] = "1"
# Prefect: a private home (cached results would otherwise leak between runs), no telemetry
os.environ["PREFECT_HOME"] = str(_DVC_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"


# The longest modules, longest first (their module and session fixtures are shared by their
# tests: a team stack and two flows, a flow, a training set). pyproject.toml's addopts hand each
# module whole to one pytest-xdist worker, in collection order: these start first, on workers of
# their own, and the short modules fill in around them.
LONGEST_FIRST = ("tests/pipelines/test_team.py", "tests/pipelines/test_retrain.py", "tests/training/test_training.py",
                 "tests/benchmarks/test_benchmarks.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest as collected


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A project folder with params.yaml, as the cwd (kdas runs from the project root)."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tool_env() -> dict[str, str]:
    return tool_environ()


# --------------------------------------------------------------------------- MLflow stores
# (mlflow is imported inside the fixtures: most tests never pay for it)


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


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A 256 KiB tmpfs: writing more fails with ENOSPC, as a full disk does."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)
