"""The model registry workflow against a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import MLFLOW_QUIET, free_port, stop, wait_for_http
from kdas import tracking
from kdas.checkpoint import load_model, save_model
from kdas.config import GateParams
from kdas.models import create_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
TINY = "polyp_pvt_tiny"
GATE = GateParams(metric="meanDic", margin=0.01, floor=0.2)
QUIET = {**MLFLOW_QUIET, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey job consumers: faster, lighter


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path) -> Iterator[str]:
    """`mlflow server`: sqlite backend and proxied artifacts in a temporary folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(mlflow_template_db, root / "mlflow.db")
    port = free_port()
    log = root / "server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env={**os.environ, **QUIET}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/health", proc, log)
        yield url
    finally:
        stop(proc)


@pytest.fixture
def project(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    for key, value in QUIET.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))  # resolve_model_file's downloads
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    monkeypatch.delenv(tracking.EXPERIMENT_ENV, raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "student.pt"
    return save_model(path, create_model(TINY), image_size=64, info={})


def aliases(name: str) -> dict[str, str]:
    model = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_registered_model(name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def version_tags(name: str, version: str) -> dict[str, str]:
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_model_version(name, version).tags


def test_gate_promotes_better_refuses_worse_and_rolls_back(project: Path, model_file: Path) -> None:
    name = "student-lifecycle"
    v1 = tracking.register_model(model_file, name, {"kvasir/meanDic": 0.6, "cvc/meanDic": 0.6})
    assert (v1.name, v1.version) == (name, "1")
    assert aliases(name) == {"challenger": "1"}
    assert float(version_tags(name, "1")["metric.meanDic"]) == pytest.approx(0.6)

    first = tracking.promote(name, GATE)
    assert first.promoted and first.challenger == "1" and first.champion_before is None
    assert aliases(name)["champion"] == "1"

    tracking.register_model(model_file, name, {"kvasir/meanDic": 0.9, "cvc/meanDic": 0.7})
    better = tracking.promote(name, GATE)
    assert better.promoted
    assert (better.challenger, better.champion_before) == ("2", "1")
    assert better.challenger_score == pytest.approx(0.8) and better.champion_score == pytest.approx(0.6)
    assert aliases(name) == {"champion": "2", "challenger": "2"}
    assert version_tags(name, "2")["previous_champion"] == "1"

    tracking.register_model(model_file, name, {"kvasir/meanDic": 0.8, "cvc/meanDic": 0.7})  # 0.75
    worse = tracking.promote(name, GATE)
    assert not worse.promoted
    assert "0.7500 < champion 0.8000" in worse.reason
    assert aliases(name) == {"champion": "2", "challenger": "3"}  # unchanged but for the new challenger
    tags = version_tags(name, "3")
    assert tags["promotion.decision"] == "rejected"
    assert tags["promotion.reason"] == worse.reason
    assert float(tags["promotion.challenger_score"]) == pytest.approx(0.75)
    assert float(tags["promotion.champion_score"]) == pytest.approx(0.8)
    assert tags["promotion.champion_before"] == "2"
    assert version_tags(name, "2")["promotion.decision"] == "promoted"

    again = tracking.promote(name, GATE)  # deterministic: the same challenger is refused again
    assert not again.promoted and aliases(name)["champion"] == "2"

    report = tracking.champion_metrics(name)
    assert report is not None and report["version"] == "2"
    assert report["metrics"]["meanDic"] == pytest.approx(0.8)

    assert tracking.rollback(name) == "1"
    assert aliases(name) == {"champion": "1", "challenger": "3"}
    assert "champion back to version 1" in version_tags(name, "2")["promotion.rolled_back"]
    with pytest.raises(tracking.RegistryError, match="nothing to roll back to"):
        tracking.rollback(name)
    assert aliases(name)["champion"] == "1"


def test_gate_refusals_and_errors(project: Path, model_file: Path) -> None:
    name = "student-errors"
    with pytest.raises(tracking.RegistryError, match="no registered model 'student-errors'"):
        tracking.promote(name, GATE)
    assert tracking.champion_metrics(name) is None

    with tracking.stage_run("evaluate") as run:
        pass
    version = tracking.register_model(model_file, name, {"kvasir/MAE": 0.03}, run_id=run.info.run_id)
    assert version.run_id == run.info.run_id  # logged into the given run
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert client.get_run(run.info.run_id).info.status == "FINISHED"

    unscored = tracking.promote(name, GATE)
    assert not unscored.promoted and "no numeric 'metric.meanDic' tag" in unscored.reason
    client.set_model_version_tag(name, "1", "metric.meanDic", "0.1")
    low = tracking.promote(name, GATE)
    assert not low.promoted and "below the floor 0.2" in low.reason
    assert version_tags(name, "1")["promotion.decision"] == "rejected"
    assert aliases(name) == {"challenger": "1"}
    assert tracking.champion_metrics(name) is None
    with pytest.raises(tracking.RegistryError, match="no 'champion': nothing to roll back"):
        tracking.rollback(name)

    # a failure half-way puts the aliases back
    with pytest.raises(RuntimeError, match="half-way"):
        with tracking._aliases_restored_on_error(client, name):
            client.set_registered_model_alias(name, "champion", "1")
            client.delete_registered_model_alias(name, "challenger")
            raise RuntimeError("half-way")
    assert aliases(name) == {"challenger": "1"}

    client.set_model_version_tag(name, "1", "metric.meanDic", "0.5")
    assert tracking.promote(name, GATE).promoted
    with pytest.raises(tracking.RegistryError, match="replaced no earlier champion"):
        tracking.rollback(name)
    assert tracking.promote(name, GATE).reason == "version 1 already is the champion"
    assert version_tags(name, "1")["promotion.decision"] == "promoted"  # evidence kept


def test_model_uri_resolves_to_the_kdas_model_file(project: Path, model_file: Path) -> None:
    name = "student-resolved"
    v1 = tracking.register_model(model_file, name, {"kvasir/meanDic": 0.7})
    path = tracking.resolve_model_file(f"models:/{name}@challenger")
    assert path.is_file() and path.is_relative_to(project / ".cache" / "kdas" / "models")
    assert path.read_bytes() == model_file.read_bytes()
    loaded = load_model(path)
    assert (loaded.config["backbone"], loaded.image_size) == ("test_convnext", 64)
    # the same version by number, and by its run, is the same file; cached: no second download
    written = path.stat().st_mtime_ns
    assert tracking.resolve_model_file(f"models:/{name}/{v1.version}") == path
    assert path.stat().st_mtime_ns == written
    assert tracking.resolve_model_file(f"runs:/{v1.run_id}/model").read_bytes() == path.read_bytes()
    # the alias moves with a new version: so does the file it resolves to
    other = save_model(project / "other.pt", create_model(TINY), image_size=96, info={})
    tracking.register_model(other, name, {"kvasir/meanDic": 0.8})
    moved = tracking.resolve_model_file(f"models:/{name}@challenger/")
    assert moved != path and load_model(moved).image_size == 96
    # a local path is returned as is
    assert tracking.resolve_model_file(model_file) == model_file
    assert tracking.resolve_model_file(str(model_file)) == model_file

    with pytest.raises(FileNotFoundError, match=r"missing\.pt: no such model file .*kdas train.*models:/"):
        tracking.resolve_model_file(project / "missing.pt")
    missing = f"models:/{name}@champion: no such MLflow model in {os.environ['MLFLOW_TRACKING_URI']}"
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        tracking.resolve_model_file(f"models:/{name}@champion")
    with pytest.raises(FileNotFoundError, match="models:/no-such-model/1: no such MLflow model"):
        tracking.resolve_model_file("models:/no-such-model/1")
    with tracking.stage_run("evaluate") as run:  # an MLflow model that is no kdas model
        mlflow.log_text("flavors:\n  python_function:\n    loader_module: x\n", "other/MLmodel")
    with pytest.raises(FileNotFoundError, match="without a kdas model file"):
        tracking.resolve_model_file(f"runs:/{run.info.run_id}/other")


def test_champion_loads_in_a_fresh_process(project: Path, model_file: Path) -> None:
    name = "student-fresh"
    tracking.register_model(model_file, name, {"kvasir/meanDic": 0.7})
    assert tracking.promote(name, GATE).promoted
    code = textwrap.dedent(
        """
        import base64, io, json, sys
        import mlflow, pandas as pd
        from PIL import Image
        model = mlflow.pyfunc.load_model(sys.argv[1])
        buf = io.BytesIO()
        Image.new("RGB", (70, 50), (200, 80, 60)).save(buf, "PNG")
        out = model.predict(pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]}))
        with Image.open(io.BytesIO(base64.b64decode(out["mask"][0]))) as mask:
            size = mask.size
        print(json.dumps({"size": size, "fraction": float(out["foreground_fraction"][0]),
                          "kdas": sys.modules["kdas"].__file__}))
        """
    )
    # no PYTHONPATH, an empty cwd: the model must bring the kdas code it was logged with
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cwd = project / "elsewhere"
    cwd.mkdir()
    cmd = [sys.executable, "-c", code, f"models:/{name}@champion"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["size"] == [70, 50]
    assert 0.0 <= result["fraction"] <= 1.0
    assert not Path(result["kdas"]).is_relative_to(ROOT)
