"""Promotion under faults (issue 23), on a real MLflow store: a promote killed before its last
tag, a champion move that fails, and a version whose stored files are incomplete. The faults
are injected at the MLflow client, the rest is real."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from mlflow.tracking import MlflowClient

from helpers import SERVE
from kdas.checkpoint import save_model
from kdas.config import GateParams
from kdas.models import create_model
from kdas.tracking.registry import RegistryError, promote, register_model, rollback

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

GATE = GateParams(metric="meanDic", margin=0.01, floor=0.2)
DATA = "synth@000000000000"
NAME = "student-faults"


def register(folder: Path, n: int, score: float) -> str:
    torch.manual_seed(n)
    model = save_model(folder / f"model{n}.pt", create_model("polyp_pvt_tiny"), image_size=64, info={})
    return register_model(model, NAME, {"synth": {"meanDic": score}}, evaluation_data=DATA, serving_config=SERVE,
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
    from kdas.config import GateParams
    from kdas.tracking.registry import promote
    real = MlflowClient.set_model_version_tag
    def dies_before_the_decision(self, name, version, key, value):
        if key == "promotion.decision" and value != "pending":
            os._exit(9)  # killed: no handler, no cleanup
        return real(self, name, version, key, value)
    MlflowClient.set_model_version_tag = dies_before_the_decision
    promote("%s", GateParams(metric="meanDic", margin=0.01, floor=0.2), version="2")
""") % NAME


def test_a_promote_killed_before_its_last_tag_is_finished_by_the_next(champion_1: Path) -> None:
    register(champion_1, 2, 0.7)
    killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_LAST_TAG], cwd=champion_1, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr[-2000:]
    aliases, record = state("2")
    assert aliases["champion"] == "2" and record["promotion.decision"] == "pending"  # never a decision it did not finish
    assert record["previous_champion"] == "1"

    again = promote(NAME, GATE, version="2")
    assert again.promoted and again.champion_before == "1" and again.challenger_score == pytest.approx(0.7)
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
        promote(NAME, GateParams(metric="meanDic", margin=0.5, floor=0.2), version="2")  # passes this gate
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
