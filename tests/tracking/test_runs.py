"""kdas.tracking runs against a real MLflow sqlite store in tmp_path (the `mlflow_store` fixture);
a tracking server that dies during training, against a real `mlflow server` on 127.0.0.1 stopped
and started again on the same store: a warning per epoch and a bounded wait, the training
finishes, and what could not be logged is logged when the server returns or named in one line
at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml
from botocore.exceptions import EndpointConnectionError  # moto's, in the test extra
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from helpers import MLFLOW_SERVER_QUIET, ROOT, free_port, start_mlflow_server, stop, tiny_teacher_project, tool_environ
from kdas.tracking.runs import (
    BOUNDED_HTTP,
    PARENT_RUN_ENV,
    TrainingLog,
    log_artifacts,
    log_data_lineage,
    log_dict,
    log_metrics,
    model_run,
    pipeline_run,
    stage_run,
)
from kdas.tracking.store import EXPERIMENT_ENV, store_error, tracking_uri


def _client() -> MlflowClient:
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=kdas", "-c", "user.email=kdas@example.org", *args],
        cwd=cwd, capture_output=True, text=True, check=True,
    )
    return out.stdout.strip()


def _dvc_project(root: Path) -> dict[str, str]:
    """A real git + DVC project: `dvc add` a raw dataset, `dvc repro` a stage that derives
    data/processed from it. Returns the md5s DVC itself wrote (.dvc file and dvc.lock)."""
    env = tool_environ()
    run = lambda *cmd: subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True)  # noqa: E731
    (root / ".gitignore").write_text("/mlflow/\n")  # the store changes with every run
    _git(root, "init", "-q")
    run("dvc", "init", "-q")
    (root / "data" / "raw" / "synth").mkdir(parents=True)
    (root / "data" / "raw" / "synth" / "a.txt").write_text("frame a")
    run("dvc", "add", "data/raw/synth")
    (root / "dvc.yaml").write_text(
        "stages:\n"
        "  prepare:\n    cmd: mkdir -p data/processed/train && cp data/raw/synth/a.txt data/processed/train/\n"
        "    deps: [data/raw/synth]\n    outs: [data/processed]\n"
        "  train:\n    cmd: kdas train\n    deps: [data/processed/train]\n"
    )
    run("dvc", "repro", "prepare")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "init")
    raw = yaml.safe_load((root / "data" / "raw" / "synth.dvc").read_text())["outs"][0]["md5"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]["outs"][0]["md5"]
    return {"raw": raw, "processed": lock}


@pytest.mark.slow
def test_default_store_is_sqlite_in_the_project(mlflow_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri() == f"sqlite:///{mlflow_store.resolve()}/mlflow/mlflow.db"
    (mlflow_store / "report").mkdir()
    (mlflow_store / "report" / "report.txt").write_text("hello")
    with stage_run("evaluate") as run:
        log_artifacts(mlflow_store / "report", "reports")
        log_dict({"meanDic": 0.5}, "metrics.json")
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "kdas"
    assert experiment.artifact_location == (mlflow_store / "mlflow" / "artifacts").resolve().as_uri()
    artifacts = mlflow_store / "mlflow" / "artifacts" / run.info.run_id / "artifacts"
    assert (artifacts / "reports" / "report.txt").read_text() == "hello"
    assert (artifacts / "metrics.json").exists()
    assert not (mlflow_store / "mlruns").exists()


@pytest.mark.slow
def test_stage_run_nested_under_pipeline_run(mlflow_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EXPERIMENT_ENV, "kdas-test")
    md5 = _dvc_project(mlflow_store)
    commit = _git(mlflow_store, "rev-parse", "HEAD")

    params = {"train": {"lr": 1e-4, "multiscale": [0.75, 1.0]}, "distill": {"method": "kdas"}}
    with pipeline_run("weekly") as parent:
        assert os.environ[PARENT_RUN_ENV] == parent.info.run_id
        with stage_run("train", params) as child:
            with pytest.warns(UserWarning, match="val/loss"):
                logged = log_metrics({"val": {"dice": 0.8, "loss": float("nan")}}, step=3)
        # a stage run by `dvc repro` is a child process: it finds its parent in the environment
        code = "from kdas.tracking.runs import stage_run\nwith stage_run('evaluate') as r:\n    print(r.info.run_id)"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", code], cwd=mlflow_store, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        grandchild_id = proc.stdout.strip().splitlines()[-1]
    assert PARENT_RUN_ENV not in os.environ
    assert logged == {"val/dice": 0.8}

    client = _client()
    run = client.get_run(child.info.run_id)
    assert run.info.run_name == "train"
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_run(grandchild_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_experiment(run.info.experiment_id).name == "kdas-test"
    assert run.data.params == {"train.lr": "0.0001", "train.multiscale": "[0.75, 1.0]", "distill.method": "kdas"}
    assert run.data.metrics == {"val/dice": 0.8}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/dice")] == [3]
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == commit
    assert tags["kdas.git.dirty"] == "false"
    assert tags["sys.python"] and tags["sys.torch"] and tags["sys.platform"]
    assert tags["sys.cpu_count"] == str(os.cpu_count())
    assert "sys.cuda_device" in tags
    # lineage: the raw dataset, and the stage's dep found among the outs upstream in dvc.lock
    assert tags["dvc.raw.synth"] == md5["raw"] and md5["raw"].endswith(".dir")
    assert tags["dvc.dep.data/processed/train"] == md5["processed"]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_failing_stage_is_marked_failed(mlflow_store: Path) -> None:
    with pytest.raises(ValueError, match="bad batch"):
        with pipeline_run() as parent:
            with stage_run("train") as child:
                raise ValueError("bad batch")
    client = _client()
    run = client.get_run(child.info.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["kdas.error"] == "ValueError: bad batch"
    assert run.data.tags["mlflow.source.git.commit"] == "unknown"  # tmp_path is no git checkout
    assert client.get_run(parent.info.run_id).info.status == "FAILED"
    assert PARENT_RUN_ENV not in os.environ
    assert mlflow.active_run() is None


def test_log_metrics_skips_non_finite_and_needs_a_run(mlflow_store: Path) -> None:
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        log_metrics({"a": 1.0})
    with stage_run("evaluate") as run:
        with pytest.warns(UserWarning, match="not a finite number"):
            log_metrics({"a": 1, "b": float("inf"), "c": float("nan")})
        with pytest.warns(UserWarning, match="not a finite number"):
            log_metrics({"d": "n/a"})
        log_artifacts(_make_dir(mlflow_store), "plots")
    data = _client().get_run(run.info.run_id).data
    assert data.metrics == {"a": 1.0}
    assert [a.path for a in _client().list_artifacts(run.info.run_id, "plots")] == ["plots/grid.txt"]


def _make_dir(root: Path) -> Path:
    folder = root / "plots"
    folder.mkdir()
    (folder / "grid.txt").write_text("x")
    return folder


def test_a_model_file_naming_another_run_logs_nothing_into_it(mlflow_store: Path) -> None:
    """A model file's mlflow_run_id is its own word: `kdas evaluate --model lying.pt` logged 52
    metrics into another run. model_run resumes a run only if that run says it wrote this model."""
    mine, other = mlflow_store / "mine.pt", mlflow_store / "lying.pt"
    mine.write_bytes(b"the model this run wrote")
    other.write_bytes(b"another model, whose file names this run")
    with stage_run("train_student") as run:
        TrainingLog().model(mine)
    from kdas.io import file_sha256

    with model_run(run.info.run_id, "evaluate_student", model_sha256=file_sha256(other)) as elsewhere:
        log_metrics({"test/meanDic": 0.9})
    with model_run(run.info.run_id, "evaluate_student", model_sha256=file_sha256(mine)) as resumed:
        log_metrics({"test/meanDic": 0.5})
    client = MlflowClient()
    assert elsewhere.info.run_id != run.info.run_id and resumed.info.run_id == run.info.run_id
    assert client.get_run(run.info.run_id).data.metrics == {"test/meanDic": 0.5}


def test_data_lineage_tolerates_missing_dvc_files(mlflow_store: Path) -> None:
    with stage_run("train"):
        assert log_data_lineage(["data/processed"], stage="train") == {}


@pytest.mark.slow
def test_an_unreachable_tracking_server_is_one_line_in_seconds(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**tool_environ(), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    model = tmp_path / "m.pt"
    from kdas.checkpoint import save_model
    from kdas.models import create_model

    save_model(model, create_model("polyp_pvt_tiny"), image_size=64)
    out = subprocess.run([sys.executable, "-m", "kdas", "predict", str(model), "--model", "models:/x@champion"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 1  # after a 5 s probe, not MLflow's minutes of retries
    assert f"http://127.0.0.1:{port} does not answer" in out.stderr and "Traceback" not in out.stderr


# --------------------------------------------------------------------------- a tracking server that dies during training


@pytest.fixture
def store(tmp_path: Path, mlflow_template_db: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, int]]:
    """A server's store folder and port, the project (cwd) in tmp_path/project pointing at it."""
    root = tmp_path / "server"
    root.mkdir()
    shutil.copy(mlflow_template_db, root / "mlflow.db")
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    for key, value in MLFLOW_SERVER_QUIET.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.delenv(EXPERIMENT_ENV, raising=False)
    yield root, port
    mlflow.set_tracking_uri(None)  # forget this server (kdas.tracking sets the global URI): later tests must not reach for it


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_epochs_logged_while_the_server_is_away_arrive_when_it_returns(store, monkeypatch, caplog):
    root, port = store
    for key, value in BOUNDED_HTTP.items():  # what a training command sets (bound_http_waits), for this test only
        monkeypatch.setenv(key, value)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    server = start_mlflow_server(root, port)
    try:
        with stage_run("train_teacher") as run:
            epochs = TrainingLog()
            epochs({"train_loss": 1.0}, 1)
            stop(server)
            for step in (2, 3):
                start = time.monotonic()
                epochs({"train_loss": 1 / step}, step)
                assert time.monotonic() - start < 15
            warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
            assert [m.split(" (")[0] for m in warned] == ["MLflow did not take epoch 2", "MLflow did not take epoch 3"]
            assert all(m.endswith("kept, to be logged when it answers again") for m in warned)
            server = start_mlflow_server(root, port)  # the same store at the same address
            epochs({"train_loss": 0.25}, 4)
            assert epochs.unlogged() is None
            stop(server)
            epochs({"best_val_meanDic": 0.5})
            (root.parent / "history.csv").write_text("epoch\n1\n")
            epochs.artifact(root.parent / "history.csv", "teacher")
            assert epochs.unlogged() == (f"MLflow run {run.info.run_id} in {uri} misses the final metrics, history.csv: its tracking "
                                         "store stopped answering (the training's own files hold every figure)")
        # ending the run with the server still away: a warning, not an error
        assert "could not be marked FINISHED" in caplog.records[-1].getMessage()
        server = start_mlflow_server(root, port)
        client = MlflowClient(uri)
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.25)]
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
    finally:
        stop(server)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kdas_train_outlives_its_tracking_server(store, tmp_path):
    root, port = store
    project = Path.cwd()
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    tiny_teacher_project(project, epochs=6, patience=10)
    server = start_mlflow_server(root, port)
    try:
        train = subprocess.Popen([sys.executable, "-m", "kdas", "train", "teacher"], cwd=project, env=tool_environ(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not (project / "models" / "teacher" / "last.ckpt").exists():  # the first epoch is done: the server dies
            assert train.poll() is None, train.communicate()
            time.sleep(0.05)
        stop(server)
        stdout, stderr = train.communicate(timeout=240)
    finally:
        stop(server)
    assert train.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "MLflow did not take epoch 6" in stderr and "MLflow did not take epoch 1 " not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("warning: MLflow run ") and "misses" in last and "epoch 6, the final metrics, history.csv" in last
    assert {"best.pt", "last.ckpt", "history.csv", "metrics.json"} <= {p.name for p in (project / "models" / "teacher").iterdir()}
    assert "best val meanDic" in stdout


@pytest.mark.parametrize(("error", "says"), [
    (lambda: MlflowException("API request to endpoint /api/2.0/mlflow-artifacts/artifacts/1/x/model_file failed with error "
                             "code 500 != 200"), "could not store artifacts (is its artifact store up?)"),
    (lambda: EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b"), "the MLflow artifact store (S3) failed: Could not connect"),
    (lambda: MlflowException("RESOURCE_DOES_NOT_EXIST: no such run"), "the MLflow tracking store"),
])
def test_a_failing_store_is_named_for_what_failed(error, says, monkeypatch):
    """The artifact store (S3, written by the client or behind the server's proxy) is not blamed on the tracking store."""
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    message = store_error(error())
    assert says in message and "\n" not in message
    assert store_error(KeyError("a bug")) is None  # a bug keeps its traceback
