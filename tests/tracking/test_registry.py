"""The model registry workflow against a real `mlflow server` on 127.0.0.1; promotion under
faults on a real sqlite store: a promote killed before its last tag, a champion move that
fails, a version whose stored files are incomplete, a store that is no database.

Versions are registered with onnx=False: the ONNX export (seconds per version) and its
serving are tested in test_export.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from mlflow.tracking import MlflowClient

from helpers import MLFLOW_SERVER_QUIET, PARAMS, ROOT, SERVE, free_port, kdas_cli, start_mlflow_server, stop
from kdas.checkpoint import load_model, save_model
from kdas.config import SplitParams, SynthParams
from kdas.data.manifest import build_manifest, data_id
from kdas.data.synth import write_synth
from kdas.evaluation.evaluate import evaluate_model
from kdas.models import create_model
from kdas.serving.inference import Segmenter
from kdas.tracking.promote import promote, rollback
from kdas.tracking.references import resolve_model_file
from kdas.tracking.registry import RegistryError, champion_metrics, register_model, version_summary
from kdas.tracking.rules import Floor, Margin, gate_rules
from kdas.tracking.runs import MODEL_TAG, PARENT_RUN_ENV, stage_run
from kdas.tracking.store import EXPERIMENT_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TINY = "polyp_pvt_tiny"
GATE = gate_rules(PARAMS.register.gate)  # floor 0.2 and margin 0.01 on the mean meanDic


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path) -> Iterator[str]:
    """`mlflow server`: sqlite backend and proxied artifacts in a temporary folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(mlflow_template_db, root / "mlflow.db")
    port = free_port()
    proc = start_mlflow_server(root, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture
def project(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    for key, value in MLFLOW_SERVER_QUIET.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))  # resolve_model_file's downloads
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.delenv(EXPERIMENT_ENV, raising=False)
    return tmp_path


DATA = "synth@000000000000"  # the evaluation data id of the registrations below


def tiny_model(folder: Path, n: int, **info) -> Path:
    """A distinct tiny model file (its content, hence its registry identity, differs by n)."""
    torch.manual_seed(n)
    return save_model(folder / f"model{n}.pt", create_model(TINY), image_size=64, info=info)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model"), 0)


def aliases(name: str) -> dict[str, str]:
    model = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_registered_model(name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def version_tags(name: str, version: str) -> dict[str, str]:
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_model_version(name, version).tags


def test_gate_promotes_better_refuses_worse_and_rolls_back(project: Path) -> None:
    name = "student-lifecycle"
    v1 = register_model(tiny_model(project, 1), name, {"kvasir": {"meanDic": 0.6}, "cvc": {"meanDic": 0.6}}, evaluation_data=DATA, serving_config=SERVE, onnx=False)
    assert (v1.name, v1.version) == (name, "1")
    assert aliases(name) == {"challenger": "1"}
    assert float(version_tags(name, "1")["metric.meanDic"]) == pytest.approx(0.6)

    first = promote(name, GATE)
    assert first.promoted and first.challenger == "1" and first.champion_before is None
    assert aliases(name)["champion"] == "1"

    register_model(tiny_model(project, 2), name, {"kvasir": {"meanDic": 0.9}, "cvc": {"meanDic": 0.7}}, evaluation_data=DATA, serving_config=SERVE, onnx=False)
    better = promote(name, GATE)
    assert better.promoted
    assert (better.challenger, better.champion_before) == ("2", "1")
    assert better.challenger_evidence.mean["meanDic"] == pytest.approx(0.8) and better.champion_evidence.mean["meanDic"] == pytest.approx(0.6)
    assert better.challenger_evidence.per_set == {"kvasir": {"meanDic": 0.9}, "cvc": {"meanDic": 0.7}}  # every metric per test set
    assert aliases(name) == {"champion": "2", "challenger": "2"}
    assert version_tags(name, "2")["previous_champion"] == "1"

    register_model(tiny_model(project, 3), name, {"kvasir": {"meanDic": 0.8}, "cvc": {"meanDic": 0.7}}, evaluation_data=DATA, serving_config=SERVE, onnx=False)
    worse = promote(name, GATE)
    assert not worse.promoted
    assert "0.7500 < champion 0.8000" in worse.reason
    assert aliases(name) == {"champion": "2", "challenger": "3"}  # unchanged but for the new challenger
    tags = version_tags(name, "3")
    assert tags["promotion.decision"] == "rejected"
    assert tags["promotion.reason"] == worse.reason
    assert {k: v for k, v in tags.items() if k.startswith("promotion.") and k not in ("promotion.decision", "promotion.time")} == worse.tags()
    assert tags["promotion.champion_before"] == "2" and worse.champion_data == worse.challenger_data == DATA
    assert [(v.name, v.passed) for v in worse.verdicts] == [("floor", True), ("margin", False)]
    assert version_tags(name, "2")["promotion.decision"] == "promoted"

    again = promote(name, GATE)  # deterministic: the same challenger is refused again
    assert not again.promoted and aliases(name)["champion"] == "2"

    report = champion_metrics(name)
    assert report is not None and report["version"] == "2" and report["data"] == DATA
    assert report["metrics"]["meanDic"] == pytest.approx(0.8)

    assert rollback(name) == "1"
    assert aliases(name) == {"champion": "1", "challenger": "3"}
    assert "champion back to version 1" in version_tags(name, "2")["promotion.rolled_back"]
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(name)
    assert aliases(name)["champion"] == "1"


def test_a_retried_register_adds_no_second_version(project: Path, model_file: Path) -> None:
    name = "student-retry"
    first = register_model(model_file, name, {"kvasir": {"meanDic": 0.7}}, evaluation_data=DATA, serving_config=SERVE, onnx=False)
    retry = register_model(model_file, name, {"kvasir": {"meanDic": 0.7}}, evaluation_data=DATA, serving_config=SERVE, onnx=False)
    assert (first.version, first.existed) == ("1", False) and (retry.version, retry.existed) == ("1", True)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert aliases(name) == {"challenger": "1"}


def test_the_version_names_its_data_commit_training_run_and_teacher(project: Path) -> None:
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=project, check=True,  # noqa: E731
                                    capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "code")
    with stage_run("train_teacher") as teacher_run:
        pass
    teacher_file = tiny_model(project, 10, role="teacher", mlflow_run_id=teacher_run.info.run_id, train_data="kvasir-seg@aaaa")
    teacher = register_model(teacher_file, "teacher-lineage", {"kvasir-seg": {"meanDic": 0.8}}, evaluation_data=DATA, serving_config=SERVE, onnx=False)
    with stage_run("train_student") as student_run:
        pass
    sha = hashlib.sha256(teacher_file.read_bytes()).hexdigest()
    student_file = tiny_model(project, 11, role="student", method="kdas", mlflow_run_id=student_run.info.run_id,
                              train_data="kvasir-seg@aaaa", teacher=str(teacher_file), teacher_sha256=sha)
    # as `kdas train` ends: its run names the model file it wrote (a file's run id alone is not trusted)
    MlflowClient().set_tag(student_run.info.run_id, MODEL_TAG, hashlib.sha256(student_file.read_bytes()).hexdigest())
    version = register_model(student_file, "student-lineage", {"kvasir-seg": {"meanDic": 0.75}}, evaluation_data=DATA,
                             teacher_name="teacher-lineage", serving_config=SERVE, onnx=False)
    assert version.run_id == student_run.info.run_id  # logged in the model's own training run: one record
    tags = version_tags("student-lineage", version.version)
    assert tags["kdas.train_data"] == "kvasir-seg@aaaa" and tags["kdas.eval_data"] == DATA
    assert tags["kdas.training_run"] == student_run.info.run_id
    assert tags["kdas.teacher_version"] == f"teacher-lineage/{teacher.version}"
    assert tags["mlflow.source.git.commit"] == git("rev-parse", "HEAD")
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    description = client.get_model_version("student-lineage", version.version).description
    assert "distilled (kdas) from teacher-lineage/1" in description and "kvasir-seg@aaaa" in description
    # the test-set metrics sit on the logged model, per evaluation dataset
    logged = client.get_logged_model(version.model_id)
    assert {(m.key, m.dataset_name) for m in logged.metrics} >= {("test/kvasir-seg/meanDic", "kvasir-seg")}
    assert "trained on kvasir-seg@aaaa" in version_summary("models:/student-lineage@challenger")


def test_champion_and_challenger_are_compared_on_the_same_data(project: Path, tmp_path: Path) -> None:
    """A champion scored on data A meets a challenger scored on data B: it is evaluated on B
    first (by the real evaluation), and the gate compares the two on B, both ways."""
    root = tmp_path / "b"
    write_synth(root / "raw" / "synth", SynthParams(n_images=8, size=64, empty_fraction=0.0, seed=5))
    manifest = build_manifest(root / "raw", ["synth"], SplitParams(val_fraction=0.0, test_fraction=0.5, seed=0),
                              near_duplicate_distance=4, workers=1)
    calls = []

    def evaluate_on_b(uri: str) -> tuple[dict[str, dict[str, float]], str]:
        calls.append(uri)
        result = evaluate_model(Segmenter.load(resolve_model_file(uri), "cpu"), manifest, tmp_path / f"eval{len(calls)}",
                                batch_size=4, grid_size=1)
        return result["datasets"], result["data"]

    data_b = data_id(manifest[manifest["split"] == "test"])
    gate = {**GATE, "floor": Floor(metric="meanDic", min=0.0, each_set=False)}  # tiny untrained models score low
    for name, delta, promoted in (("compare-better", +0.05, True), ("compare-worse", -0.05, False)):
        champion = tiny_model(project, 20)
        register_model(champion, name, {"kvasir-seg": {"meanDic": 0.99}}, evaluation_data="kvasir-seg@aaaaaaaaaaaa", serving_config=SERVE, onnx=False)
        assert promote(name, gate).promoted
        on_b = evaluate_on_b(str(champion))[0]["mean"]["meanDic"]  # what the champion scores on B
        challenger = tiny_model(project, 21 if promoted else 22)
        register_model(challenger, name, {"synth": {"meanDic": on_b + delta}}, evaluation_data=data_b, serving_config=SERVE, onnx=False)
        blind = promote(name, gate)  # without a way to evaluate: never decided on other data
        assert not blind.promoted and "scored on other data" in blind.reason
        decision = promote(name, gate, evaluate_on_b)
        assert decision.promoted is promoted, decision.reason
        assert decision.champion_evidence.mean["meanDic"] == pytest.approx(on_b) and decision.champion_data == decision.challenger_data == data_b
        assert decision.champion_evidence.per_set["synth"]["meanDic"] == pytest.approx(on_b)  # every metric per test set, on B
        assert calls[-1] == f"models:/{name}/1"
        key = hashlib.sha256(data_b.encode()).hexdigest()[:12]
        assert float(version_tags(name, "1")[f"eval.{key}/meanDic"]) == pytest.approx(on_b)
        assert float(version_tags(name, "1")[f"eval.{key}/synth/mae"]) == decision.champion_evidence.per_set["synth"]["mae"]


def test_model_uri_resolves_to_the_kdas_model_file(project: Path, model_file: Path) -> None:
    name = "student-resolved"
    v1 = register_model(model_file, name, {"kvasir": {"meanDic": 0.7}}, evaluation_data=DATA, serving_config=SERVE, onnx=False)
    path = resolve_model_file(f"models:/{name}@challenger")
    assert path.is_file() and path.is_relative_to(project / ".cache" / "kdas" / "models")
    assert path.read_bytes() == model_file.read_bytes()
    loaded = load_model(path)
    assert (loaded.config["backbone"], loaded.image_size) == ("test_convnext", 64)
    # the same version by number, and by its run, is the same file; cached: no second download
    written = path.stat().st_mtime_ns
    assert resolve_model_file(f"models:/{name}/{v1.version}") == path
    assert path.stat().st_mtime_ns == written
    assert resolve_model_file(f"runs:/{v1.run_id}/model").read_bytes() == path.read_bytes()
    # the alias moves with a new version: so does the file it resolves to
    other = save_model(project / "other.pt", create_model(TINY), image_size=96, info={})
    register_model(other, name, {"kvasir": {"meanDic": 0.8}}, evaluation_data=DATA, serving_config=SERVE, onnx=False)
    moved = resolve_model_file(f"models:/{name}@challenger/")
    assert moved != path and load_model(moved).image_size == 96
    # a local path is returned as is
    assert resolve_model_file(model_file) == model_file
    assert resolve_model_file(str(model_file)) == model_file

    with pytest.raises(FileNotFoundError, match=r"missing\.pt: no such model file .*kdas train.*models:/"):
        resolve_model_file(project / "missing.pt")
    missing = f"models:/{name}@champion: no such MLflow model in {os.environ['MLFLOW_TRACKING_URI']}"
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        resolve_model_file(f"models:/{name}@champion")
    with pytest.raises(FileNotFoundError, match="models:/no-such-model/1: no such MLflow model"):
        resolve_model_file("models:/no-such-model/1")
    with stage_run("evaluate") as run:  # an MLflow model that is no kdas model
        mlflow.log_text("flavors:\n  python_function:\n    loader_module: x\n", "other/MLmodel")
    with pytest.raises(FileNotFoundError, match="without a kdas model file"):
        resolve_model_file(f"runs:/{run.info.run_id}/other")


def test_champion_loads_in_a_fresh_process(project: Path, model_file: Path) -> None:
    name = "student-fresh"
    register_model(model_file, name, {"kvasir": {"meanDic": 0.7}}, evaluation_data=DATA, serving_config=SERVE, onnx=False)
    assert promote(name, GATE).promoted
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


# --------------------------------------------------------------------------- promotion under faults (issue 23), on a sqlite store (the faults injected at the MLflow client)


NAME = "student-faults"  # the model of the tests below


def register(folder: Path, n: int, score: float) -> str:
    return register_model(tiny_model(folder, n), NAME, {"synth": {"meanDic": score}}, evaluation_data=DATA, serving_config=SERVE,
                          onnx=False).version


def state(version: str) -> tuple[dict[str, str], dict[str, str]]:
    """(aliases of NAME, the promotion record of `version`)."""
    client = MlflowClient()
    aliases = {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}
    tags = client.get_model_version(NAME, version).tags
    return aliases, {k: v for k, v in tags.items() if k.startswith("promotion.") or k == "previous_champion"}


@pytest.fixture
def champion_1(mlflow_store: Path) -> Path:
    """Version 1 promoted to champion."""
    register(mlflow_store, 1, 0.5)
    assert promote(NAME, GATE, version="1").promoted
    return mlflow_store


KILLED_BEFORE_LAST_TAG = textwrap.dedent("""\
    import os
    from mlflow.tracking import MlflowClient
    from kdas.config import load_params
    from kdas.tracking.promote import promote
    from kdas.tracking.rules import gate_rules
    real = MlflowClient.set_model_version_tag
    def dies_before_the_decision(self, name, version, key, value):
        if key == "promotion.decision" and value != "pending":
            os._exit(9)  # killed: no handler, no cleanup
        return real(self, name, version, key, value)
    MlflowClient.set_model_version_tag = dies_before_the_decision
    promote(%r, gate_rules(load_params(%r).register.gate), version="2")
""") % (NAME, str(ROOT / "params.yaml"))


def test_a_promote_killed_before_its_last_tag_is_finished_by_the_next(champion_1: Path) -> None:
    register(champion_1, 2, 0.7)
    killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_LAST_TAG], cwd=champion_1, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr[-2000:]
    aliases, record = state("2")
    assert aliases["champion"] == "2" and record["promotion.decision"] == "pending"  # never a decision it did not finish
    assert record["previous_champion"] == "1"

    again = promote(NAME, GATE, version="2")
    assert again.promoted and again.champion_before == "1" and again.challenger_evidence.mean["meanDic"] == pytest.approx(0.7)
    assert "completed now" in again.reason
    aliases, record = state("2")
    assert aliases["champion"] == "2" and record["promotion.decision"] == "promoted"
    assert record["promotion.champion_before"] == "1"
    third = promote(NAME, GATE, version="2")
    assert not third.promoted and "already is the champion" in third.reason
    assert rollback(NAME) == "1"  # the completed record is a full one


def test_a_failed_champion_move_leaves_no_evidence_and_the_aliases(champion_1: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register(champion_1, 2, 0.3)
    rejected = promote(NAME, GATE, version="2")  # 0.3 < 0.5 - margin: a record of its rejection
    assert not rejected.promoted
    before = state("2")
    assert before[1]["promotion.decision"] == "rejected"

    real = MlflowClient.set_registered_model_alias

    def fails_to_move_the_champion(self, name, alias, version):
        if alias == "champion":
            raise MlflowException("the store went away")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", fails_to_move_the_champion)
    with pytest.raises(MlflowException, match="went away"):
        promote(NAME, {**GATE, "margin": Margin(metric="meanDic", margin=0.5, each_set=False)}, version="2")  # passes this gate
    assert state("2") == before  # neither 'pending' nor the evidence of a promotion that did not happen


def test_the_champion_never_moves_to_a_version_with_incomplete_files(champion_1: Path) -> None:
    version = register(champion_1, 4, 0.9)
    stored = Path(urlparse(ModelsArtifactRepository.get_underlying_uri(f"models:/{NAME}/{version}")).path)
    model_file = next((stored / "artifacts").glob("*.pt"))
    model_file.write_bytes(model_file.read_bytes()[: os.path.getsize(model_file) // 2])  # a half-written copy
    before = state(version)
    with pytest.raises(RegistryError, match=r"artifacts/model4\.pt .* is incomplete \(\d+ bytes, registered \d+\)"):
        promote(NAME, GATE, version=version)
    assert state(version) == before and before[0]["champion"] == "1"
    model_file.unlink()
    with pytest.raises(RegistryError, match=r"incomplete \(missing\)"):
        promote(NAME, GATE, version=version)


@pytest.mark.slow
def test_a_failing_tracking_store_under_promote_is_one_line(workdir, monkeypatch):
    (workdir / "bad.db").write_bytes(np.random.default_rng(0).bytes(4096))  # not a database
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'bad.db'}")
    code, output = kdas_cli("promote", "--version", "1")  # the version named: nothing is read before the store
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert output.startswith(f"error: the MLflow tracking store sqlite:///{workdir / 'bad.db'} failed: ") and "file is not a database" in output
