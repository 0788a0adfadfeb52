"""Two `kdas register` of one model file at once add one version, not two with the same digest
(issue 32, low 5): on a SQLite store and through an `mlflow server`, where no file lock of one
machine would hold."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import MLFLOW_SERVER_QUIET, ROOT, free_port, start_mlflow_server, stop
from kdas.checkpoint import save_model
from kdas.models import create_model
from kdas.tracking.registry import SHA_TAG

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture(params=["sqlite", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path, mlflow_template_db: Path) -> Iterator[str]:
    root = tmp_path / "store"
    root.mkdir()
    shutil.copy(mlflow_template_db, root / "mlflow.db")
    if request.param == "sqlite":
        yield f"sqlite:///{root / 'mlflow.db'}"
        return
    port = free_port()
    proc = start_mlflow_server(root, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def test_two_registrations_of_one_file_at_once_add_one_version(store: str, tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["register"]["onnx"] = False  # the export costs seconds; test_export.py registers one with it
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    model = save_model(tmp_path / "models" / "teacher" / "best.pt", create_model("polyp_pvt_tiny"), image_size=64, info={"role": "teacher"})
    metrics = tmp_path / "reports" / "evaluate" / "teacher" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"data": "synth@000000000000", "datasets": {"synth": {"meanDic": 0.5}, "mean": {"meanDic": 0.5}}}))
    env = {**os.environ, **MLFLOW_SERVER_QUIET, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "kdas", "register", "--role", "teacher", "--out", f"reports/register/{i}.json"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    records = [json.loads((tmp_path / "reports" / "register" / f"{i}.json").read_text()) for i in range(2)]
    client = MlflowClient(store)
    versions = client.search_model_versions("name = 'kdas-teacher'")
    assert [str(v.version) for v in versions] == ["1"], outputs  # one version, with its model's digest
    assert versions[0].tags[SHA_TAG] == records[0]["sha256"] == records[1]["sha256"]
    assert records[0]["version"] == records[1]["version"] == "1" and records[0]["run_id"] == records[1]["run_id"] == versions[0].run_id
    assert {k: str(v) for k, v in client.get_registered_model("kdas-teacher").aliases.items()} == {"challenger": "1"}
    assert sum("no new version" in out for out in outputs) == 1, outputs
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert len(client.search_logged_models(experiments)) == 1  # the second one's logged model went with its version
    assert model.exists()
