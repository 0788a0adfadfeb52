"""Runs: the flow's parent run, one run per stage, and the one record of a model (its
training run, which evaluate and register resume)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from kdas.provenance import flatten, git_tags, lineage_tags, system_tags
from kdas.tracking.store import ensure_experiment, get_client, project_dir, tracking_uri

PARENT_RUN_ENV = "KDAS_PARENT_RUN_ID"
_PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value




@contextlib.contextmanager
def pipeline_run(name: str = "pipeline", params: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """The parent run of a pipeline execution.

    Exports ``KDAS_PARENT_RUN_ID`` (and the resolved ``MLFLOW_TRACKING_URI``) so that the
    stages, run as ``dvc repro`` subprocesses, nest their runs under it; both are
    restored on exit.
    """
    with _run(name, params, kind="pipeline") as run:
        exported = {PARENT_RUN_ENV: run.info.run_id, "MLFLOW_TRACKING_URI": tracking_uri()}
        saved = {key: os.environ.get(key) for key in exported}
        os.environ.update(exported)
        try:
            yield run
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None, dvc_stage: str | None = None) -> Iterator[Any]:
    """One MLflow run per pipeline stage, named after it.

    Nested under the active run if there is one, else under ``KDAS_PARENT_RUN_ID`` if set.
    An exception marks the run FAILED (and is re-raised). `dvc_stage`: the dvc.yaml stage
    whose deps are the run's lineage (default: `stage`).
    """
    with _run(stage, params, kind="stage") as run:
        log_data_lineage(stage=dvc_stage or stage)
        yield run


@contextlib.contextmanager
def _run(name: str, params: Mapping[str, Any] | None, kind: str) -> Iterator[Any]:
    client = get_client()
    active = mlflow.active_run()
    parent = None if active else (os.environ.get(PARENT_RUN_ENV) or None)
    # a nested run belongs in its parent's experiment, whatever this process would pick
    if active:
        experiment_id = active.info.experiment_id
    elif parent:
        experiment_id = client.get_run(parent).info.experiment_id
    else:
        experiment_id = ensure_experiment(client)
    tags = {"kdas.kind": kind, "kdas.stage": name, **git_tags(), **system_tags()}
    run = mlflow.start_run(
        experiment_id=experiment_id, run_name=name, nested=active is not None, parent_run_id=parent, tags=tags
    )
    try:
        if params:
            log_params(params)
        yield run
    except BaseException as exc:
        status = RunStatus.KILLED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED
        with contextlib.suppress(Exception):  # never hide the stage's own error
            mlflow.set_tag("kdas.error", f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.end_run(RunStatus.to_string(status))
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def _require_run() -> None:
    # the fluent API would silently start a run of its own
    if mlflow.active_run() is None:
        raise RuntimeError("no active MLflow run: log inside `with stage_run(...)`")


@contextlib.contextmanager
def model_run(run_id: str | None, stage: str, params: Mapping[str, Any] | None = None, dvc_stage: str | None = None) -> Iterator[Any]:
    """The model's own record: its training run `run_id` (from the model file), resumed, so
    that training curves, evaluation and the registered model are one run; a model with no
    run in this store (trained elsewhere) gets a new stage run instead."""
    if run_id and mlflow.active_run() is None:
        try:
            get_client().get_run(run_id)
        except MlflowException:
            run_id = None
    if not run_id or mlflow.active_run() is not None:
        with stage_run(stage, params, dvc_stage) as run:
            yield run
        return
    with mlflow.start_run(run_id=run_id) as run:
        mlflow.set_tag(f"kdas.stage.{stage}", "done")
        log_data_lineage(stage=dvc_stage or stage)
        if params:
            log_params(params)
        yield run


def log_params(params: Mapping[str, Any]) -> None:
    """Flat, one param per key (`train.lr`, `distill.alpha`): runs filter and sort by them.
    Dataclasses (kdas.config's typed params) are flattened like dicts."""
    _require_run()
    plain = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in params.items()}
    flat = {k: str(v)[:_PARAM_VALUE_LIMIT] for k, v in flatten(plain).items()}
    mlflow.log_params(flat)


def log_metrics(metrics: Mapping[str, Any], step: int | None = None, *, model_id: str | None = None, dataset: Any = None) -> dict[str, float]:
    """Log numeric metrics (nested dicts flattened with "/"); NaN/inf and non-numbers are
    skipped with a warning (MLflow would store them, and they would poison comparisons).
    `model_id` and `dataset` attach them to a logged model and an evaluation dataset."""
    _require_run()
    clean: dict[str, float] = {}
    for key, value in flatten(metrics, sep="/").items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            warnings.warn(f"metric {key}={value!r} is not a number: not logged", stacklevel=2)
            continue
        if not math.isfinite(number):
            warnings.warn(f"metric {key}={number} is not finite: not logged", stacklevel=2)
            continue
        clean[key] = number
    if clean:
        mlflow.log_metrics(clean, step=step, model_id=model_id, dataset=dataset)
    return clean


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    _require_run()
    mlflow.log_artifact(os.fspath(path), artifact_path)


def log_artifacts(directory: str | Path, artifact_path: str | None = None) -> None:
    _require_run()
    mlflow.log_artifacts(os.fspath(directory), artifact_path)


def log_dict(data: Mapping[str, Any], artifact_file: str) -> None:
    """A dict as a JSON (``.json``) or YAML (``.yaml``) artifact."""
    _require_run()
    mlflow.log_dict(dict(data), artifact_file)


def log_data_lineage(paths: Iterable[str | Path] = (), *, stage: str | None = None) -> dict[str, str]:
    """Tag the active run with the DVC md5 of what it read: each of `paths`, the deps of
    `stage` (dvc.yaml / dvc.lock) and every raw dataset (``data/raw/*.dvc``). Paths DVC does
    not track are left out; no DVC files at all is not an error. Returns the tags."""
    _require_run()
    tags = lineage_tags(project_dir(), paths, stage)
    if tags:
        mlflow.set_tags(tags)
    return tags
