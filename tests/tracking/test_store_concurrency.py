"""Several kdas processes opening one fresh SQLite tracking store at once all get it: MLflow's
schema migration raced itself ("duplicate column name: step", an alembic row not found) and
all but one failed (issue 32, low 6)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import MLFLOW_QUIET

pytestmark = pytest.mark.slow

OPEN = "from kdas.tracking.store import ensure_experiment; print(ensure_experiment())"


@pytest.mark.timeout(180)
def test_processes_on_a_fresh_sqlite_store_at_once(tmp_path: Path) -> None:
    env = {**os.environ, **MLFLOW_QUIET, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"}
    (tmp_path / "store").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", OPEN], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    results = [(p.wait(150), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0, 0], "\n".join(err[-800:] for _, _, err in results)
    assert len({out.split()[-1] for _, out, _ in results}) == 1  # one kdas experiment
