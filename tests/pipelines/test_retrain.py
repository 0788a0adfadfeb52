"""The retrain flow end to end: a Prefect test server, a temporary git + DVC repository,
a temporary MLflow store, the tiny profile on synthetic data."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from helpers import MLFLOW_QUIET, ROOT, TINY, dvc_project, make_dataset, tool_environ

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_template_db, prefect_server):
    """A git + DVC repository holding the project's DAG, code and tiny params."""
    root = dvc_project(tmp_path_factory.mktemp("project"), mlflow_template_db, TINY)
    shutil.copy(ROOT / ".gitignore", root / ".gitignore")  # DVC metrics and plots files are committed, as in the project
    run = lambda *cmd: subprocess.run(cmd, cwd=root, check=True, env=tool_environ(), capture_output=True)  # noqa: E731
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")  # the default remote: ../kdas-dvc-remote
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
        mp.setenv("XDG_CACHE_HOME", str(root / ".cache"))
        for key, value in MLFLOW_QUIET.items():
            mp.setenv(key, value)
        yield root
    import mlflow

    mlflow.set_tracking_uri(None)


def registry_state(name: str) -> tuple[list[str], dict[str, str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} if versions else {}
    return versions, aliases


@pytest.fixture(scope="module")
def first_run(project):
    """The flow's first run in the fresh project (the tests below start from its state)."""
    from pipelines.retrain import retrain

    result = retrain(workspace=str(project))
    registry = {name: registry_state(name) for name in ("kdas-teacher", "kdas-student")}
    return result, registry


def test_first_run_trains_evaluates_registers_and_gates(project, first_run):
    from mlflow.tracking import MlflowClient

    result, registry = first_run
    assert all(result["ran"].values()), result["ran"]
    # the gate's floor is 0 and there was no champion: both versions 1 are promoted
    assert registry == {name: (["1"], {"challenger": "1", "champion": "1"}) for name in ("kdas-teacher", "kdas-student")}
    assert result["decisions"]["student"]["promoted"] and result["decisions"]["teacher"]["promoted"]

    reports = project / "reports" / "evaluate" / "student"
    for name in ("metrics.json", "per_image.csv", "curves.csv", "curves.png", "datasets.png", "grid.png"):
        assert (reports / name).stat().st_size > 0, name
    metrics = json.loads((reports / "metrics.json").read_text())
    assert set(metrics["datasets"]) == {"synth", "mean"} and 0 <= metrics["datasets"]["synth"]["meanDic"] <= 1

    # one record per model: its training run, nested under the flow's parent run, holds its
    # curves, its evaluation and the registered model, with flat params and lineage
    client = MlflowClient()
    experiment = client.get_experiment_by_name("kdas")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    by_name = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent = by_name["retrain"]
    student = by_name["train_student"]
    for stage in ("train_teacher", "train_student"):
        assert by_name[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
        assert by_name[stage].data.tags["mlflow.source.git.commit"] != "unknown"
    assert "evaluate_student" not in by_name and "register_student" not in by_name
    # the student's method and its own settings, not every method's
    assert student.data.params["distill.kdas.weight"] == "0.43" and student.data.params["train.image_size"] == "64"
    assert not any(key.startswith(("distill.kd.", "distill.sgm.")) for key in student.data.params)
    assert "test/synth/meanDic" in student.data.metrics and student.data.tags["kdas.stage.evaluate_student"] == "done"
    assert any(key.startswith("dvc.dep.") for key in student.data.tags)
    artifacts = {a.path for a in client.list_artifacts(student.info.run_id, "evaluate/student")}
    assert {"evaluate/student/grid.png", "evaluate/student/metrics.json"} <= artifacts
    assert client.get_metric_history(student.info.run_id, "val_meanDic")
    version = client.get_model_version("kdas-student", "1")
    assert version.run_id == student.info.run_id
    assert version.tags["kdas.teacher_version"] == "kdas-teacher/1" and version.tags["kdas.train_data"].startswith("synth@")
    assert "kdas.onnx" not in version.tags  # the tiny profile's register.onnx: false reached the register stage


def test_second_run_with_nothing_changed_skips_the_training_stages(project, first_run):
    from pipelines.retrain import retrain

    before = registry_state("kdas-student")
    result = retrain(workspace=str(project))
    for stage in ("train_teacher", "distill", "evaluate@student", "register@student"):
        assert result["ran"][stage] is False, stage
    assert registry_state("kdas-student") == before


def test_reusing_the_registered_teacher_skips_teacher_training(project, first_run):
    from kdas.tracking.references import resolve_model_file
    from pipelines.retrain import retrain

    result = retrain(workspace=str(project), retrain_teacher=False)
    assert "train_teacher" not in result["ran"] and set(result["decisions"]) == {"student"}
    champion = resolve_model_file("models:/kdas-teacher@champion")
    assert (project / "models" / "teacher" / "best.pt").read_bytes() == champion.read_bytes()
    assert result["ran"]["distill"] is False  # the same teacher: nothing to distil again


def test_results_push_to_the_default_remote_and_come_back(project, first_run):
    dvc = lambda *args: subprocess.run(["dvc", *args], cwd=project, env=tool_environ(), capture_output=True, text=True)  # noqa: E731
    push = dvc("push")
    assert push.returncode == 0, push.stderr
    assert any((project.parent / "kdas-dvc-remote").rglob("*"))
    student = project / "models" / "student" / "best.pt"
    content = student.read_bytes()
    shutil.rmtree(project / ".dvc" / "cache")
    student.unlink()
    pull = dvc("pull")
    assert pull.returncode == 0, pull.stderr
    assert student.read_bytes() == content


def test_a_second_flow_in_the_same_workspace_is_refused(project, first_run):
    from pipelines.retrain import LOCK, WorkspaceBusy, retrain

    with (project / LOCK).open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(WorkspaceBusy, match="another retrain flow is running"):
            retrain(workspace=str(project))


def test_distillation_experiments_rerun_distill_evaluate_and_register_only_and_compare(project, first_run):
    dvc = lambda *args: subprocess.run(["dvc", *args], cwd=project, env=tool_environ(), capture_output=True, text=True)  # noqa: E731
    git = lambda *args: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=project, check=True,  # noqa: E731
                                       capture_output=True)
    git("add", "-A")
    git("commit", "-qm", "first run")  # the baseline the experiments compare with
    assert "Data and pipelines are up to date" in dvc("status").stdout
    versions = len(registry_state("kdas-student")[0])
    exp = dvc("exp", "run", "-n", "weight-0.1", "-S", "distill.kdas.weight=0.1")
    assert exp.returncode == 0, exp.stderr[-2000:]
    ran = {line.split("'")[1] for line in exp.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"distill", "evaluate@student", "register@student"}
    assert registry_state("kdas-student")[0] == [str(v) for v in range(1, versions + 2)]  # the experiment's student
    shown = json.loads(dvc("exp", "show", "--json").stdout)
    found = {rev["name"]: rev["data"]["metrics"] for base in shown for exp in base.get("experiments") or []
             for rev in exp.get("revs") or [] if rev.get("name")}
    assert set(found) == {"weight-0.1"}
    for metrics in found.values():  # real numbers, not "!"
        assert 0 <= metrics["reports/evaluate/student/metrics.json"]["data"]["datasets"]["synth"]["meanDic"] <= 1
    diff = dvc("metrics", "diff")
    assert diff.returncode == 0 and "reports/evaluate/student/metrics.json" in diff.stdout
    plots = dvc("plots", "diff", "-o", "plots-diff")
    assert plots.returncode == 0 and (project / "plots-diff" / "index.html").exists()


def test_broken_data_contract_stops_before_training_and_leaves_the_registry(project, first_run):
    from pipelines.retrain import retrain

    bad = make_dataset(project / "data" / "raw" / "bad", n=6)
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(bad / "masks" / "img03.png")  # size mismatch
    teacher_before = (project / "models" / "teacher" / "best.pt").read_bytes()
    registry_before = registry_state("kdas-student"), registry_state("kdas-teacher")

    params = (project / "params.yaml").read_text()
    try:
        with pytest.raises(Exception, match="validate"):
            retrain(workspace=str(project), datasets=["synth", "bad"])
    finally:  # leave the project as the other tests expect it
        (project / "params.yaml").write_text(params)
        shutil.rmtree(bad)

    report = json.loads((project / "reports" / "validation.json").read_text())
    assert not report["success"]
    assert any(f["rule"] == "mask_size" and f["file"].endswith("img03.png") for f in report["findings"])
    assert (registry_state("kdas-student"), registry_state("kdas-teacher")) == registry_before
    assert (project / "models" / "teacher" / "best.pt").read_bytes() == teacher_before


def test_against_another_store_the_flow_promotes_this_workspaces_model_never_that_stores_number(project, first_run, tmp_path, monkeypatch,
                                                                                                  mlflow_template_db):
    """A version number names no model: store S already holds other models as kdas-teacher and
    kdas-student version 1, the numbers this workspace's records (from its own store) name. Run
    against S with every stage up to date in DVC, `kdas promote` refuses in one line, and the
    flow registers this workspace's models again and promotes those, never S's version 1."""
    from helpers import SERVE, kdas_cli
    from kdas.checkpoint import save_model
    from kdas.io import file_sha256
    from kdas.models import create_model
    from kdas.tracking.registry import register_model
    from pipelines.retrain import retrain

    store = tmp_path / "other-store.db"
    shutil.copy(mlflow_template_db, store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    recorded = {role: int(json.loads((project / "reports" / "register" / f"{role}.json").read_text())["version"]) for role in ("teacher", "student")}
    for role, n in recorded.items():  # another workspace's models in S, up to the numbers this workspace recorded
        for k in range(n):
            other = save_model(tmp_path / f"{role}-{k}.pt", create_model("polyp_pvt_tiny"), image_size=64, info={"role": role})
            register_model(other, f"kdas-{role}", {"synth": {"meanDic": 0.1}}, evaluation_data="synth@000000000000", serving_config=SERVE,
                           onnx=False)
    code, out = kdas_cli("promote", "--role", "student")
    assert code == 1 and "is another model" in out and "kdas register --role student" in out and "Traceback" not in out
    assert "champion" not in registry_state("kdas-student")[1]

    result = retrain(workspace=str(project))
    for role, n in recorded.items():
        decision = result["decisions"][role]
        assert decision["challenger"] == str(n + 1) and decision["promoted"], decision
        from mlflow.tracking import MlflowClient

        tags = MlflowClient().get_model_version(f"kdas-{role}", str(n + 1)).tags
        assert tags["kdas.model_sha256"] == file_sha256(project / "models" / role / "best.pt")
