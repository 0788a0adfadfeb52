"""A drift verdict in MLflow: a `monitor` run with its score and report, and, for a
registered version, the score as that version's tags."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from kdas.io import file_sha256
from kdas.monitoring.drift import Verdict
from kdas.tracking.runs import log_metrics, stage_run
from kdas.tracking.store import get_client, masked, tracking_uri

log = logging.getLogger(__name__)


def log_verdict(verdict: Verdict, model_ref: str, model_file: Path, out: Path) -> str | None:
    """A `monitor` run with the score, the files and the model it watched (its digest, and its
    registry version when `model_ref` names one, which gets the score as tags kdas.drift.*).
    A store that fails costs a warning: the verdict is written already."""
    try:
        version = registered_version(model_ref)
        with stage_run("monitor", {"model": model_ref, "frames": verdict.frames}) as run:
            mlflow.set_tag("kdas.monitor.model_sha256", file_sha256(model_file))
            if version is not None:
                mlflow.set_tags({"kdas.monitor.model": version.name, "kdas.monitor.version": version.version})
            log_metrics({"drift_score": verdict.score, "drift": float(verdict.drift), "drifted_features": float(sum(
                f["drift"] for f in verdict.features.values())), "frames": float(verdict.frames)})
            mlflow.log_artifact(str(out / "drift.json"))
            mlflow.log_artifact(str(out / "report.html"))
        if version is not None:
            client = get_client()
            for key, value in {"kdas.drift.score": f"{verdict.score:.4f}", "kdas.drift.detected": str(verdict.drift).lower(),
                               "kdas.drift.run_id": run.info.run_id}.items():
                client.set_model_version_tag(version.name, version.version, key, value)
        return run.info.run_id
    except MlflowException as exc:
        log.warning("the drift score was not logged to MLflow at %s (%s)", masked(tracking_uri()), masked(exc.message.splitlines()[0]))
        return None


def registered_version(model_ref: str) -> ModelVersion | None:
    """The registry version a models:/NAME@ALIAS or models:/NAME/VERSION reference names (None for runs:/)."""
    if not model_ref.startswith("models:/"):
        return None
    name, _, rest = model_ref[len("models:/"):].partition("@")
    client = get_client()
    if rest:
        return client.get_model_version_by_alias(name, rest)
    name, _, number = name.rstrip("/").partition("/")
    return client.get_model_version(name, number)
