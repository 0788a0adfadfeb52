"""Runs: the flow's parent run, one run per stage, and the one record of a model (its
training run, which evaluate and register resume)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException

from kdas.provenance import finite_metrics, flatten, git_tags, lineage_tags, system_tags
from kdas.tracking.store import check_reachable, ensure_experiment, get_client, masked, project_dir, tracking_uri

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "KDAS_PARENT_RUN_ID"
_PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value
# MLflow's client retries a failed call 7 times with exponential backoff, 120 s each: a
# tracking server that died during training stalled the run 12 minutes, then stopped it.
# A training's calls get 2 retries, 1 s backoff, 10 s timeouts; what fails waits in TrainingLog.
BOUNDED_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def bound_http_waits() -> None:
    """Short MLflow HTTP retries and timeouts (BOUNDED_HTTP) for the rest of this process,
    a training command; values the user set in the environment are kept."""
    for key, value in BOUNDED_HTTP.items():
        os.environ.setdefault(key, value)


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
    An exception marks the run FAILED, a stop from outside (SIGINT, SIGTERM) KILLED; either is
    re-raised. `dvc_stage`: the dvc.yaml stage whose deps are the run's lineage (default: `stage`).
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
    except BaseException as exc:  # KeyboardInterrupt, SystemExit: stopped from outside (SIGINT, SIGTERM)
        status = RunStatus.KILLED if isinstance(exc, (KeyboardInterrupt, SystemExit)) else RunStatus.FAILED
        with contextlib.suppress(Exception):  # never hide the stage's own error
            mlflow.set_tag("kdas.error", masked(f"{type(exc).__name__}: {exc}")[:5000])
        with contextlib.suppress(Exception):  # nor by a store that is gone too
            mlflow.end_run(RunStatus.to_string(status))
        raise
    try:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
    except MlflowException as exc:  # the stage's work is done and written: a lost status must not undo it
        log.warning("MLflow run %s could not be marked FINISHED (%s); it shows RUNNING in %s", run.info.run_id, _short(exc), masked(tracking_uri()))


def _require_run() -> None:
    # the fluent API would silently start a run of its own
    if mlflow.active_run() is None:
        raise RuntimeError("no active MLflow run: log inside `with stage_run(...)`")


MODEL_TAG = "kdas.model_sha256"  # on a training run: the digest of the model file it wrote


@contextlib.contextmanager
def model_run(run_id: str | None, stage: str, params: Mapping[str, Any] | None = None, dvc_stage: str | None = None, *,
              model_sha256: str) -> Iterator[Any]:
    """The model's own record: its training run `run_id` (from the model file), resumed, so
    that training curves, evaluation and the registered model are one run. The file's word is
    not taken: the run must say it wrote this model (MODEL_TAG = `model_sha256`), so a model
    file naming another run (a copy edited, or one from another store) logs nothing into it; a
    model with no run of its own in this store gets a new stage run instead."""
    if run_id and mlflow.active_run() is None:
        try:
            if get_client().get_run(run_id).data.tags.get(MODEL_TAG) != model_sha256:
                log.warning("MLflow run %s did not write this model (digest %s): logging into a new run", run_id, model_sha256[:12])
                run_id = None
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
    """Flat, one param per key (`train.lr`, `distill.kd.weight`): runs filter and sort by them.
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
    clean = finite_metrics(metrics)
    if clean:
        mlflow.log_metrics(clean, step=step, model_id=model_id, dataset=dataset)
    return clean


def _short(exc: BaseException) -> str:
    """An error in one short line (MLflow's connection errors run to a paragraph)."""
    text = masked(" ".join(str(exc).split()))
    return text if len(text) <= 200 else text[:197] + "..."


class TrainingLog:
    """What a training logs to its run while it trains: the engine's per-epoch callback
    (`job.on_epoch = TrainingLog()`), then its final metrics and files.

    A tracking store that stops answering costs a warning per call and a bounded wait (a
    TCP probe, then BOUNDED_HTTP), never the training: what was not taken is kept and sent,
    with its own step and time, by the next call that gets through. `unlogged()` names what
    never was."""

    def __init__(self) -> None:
        _require_run()
        self.run_id = mlflow.active_run().info.run_id
        self.uri = tracking_uri()
        self.metrics: list[Metric] = []
        self.waiting: list[str] = []  # the metrics kept, in words: "epoch 3", "the final metrics"
        self.files: list[tuple[str, str | None]] = []
        self.tags: dict[str, str] = {}

    def __call__(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        self.metrics += [Metric(key, value, now, step or 0) for key, value in finite_metrics(metrics).items()]
        self.waiting.append(f"epoch {step}" if step is not None else "the final metrics")
        self._send(self.waiting[-1])

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.files.append((os.fspath(path), artifact_path))
        self._send(Path(path).name)

    def model(self, path: str | Path) -> None:
        """The model file this run wrote, by digest: what model_run checks before it logs into this run again."""
        from kdas.io import file_sha256

        self.tags[MODEL_TAG] = file_sha256(path)
        self._send("the model's digest")

    def _send(self, what: str) -> None:
        try:
            check_reachable(self.uri)  # a closed port answers at once; MLflow's retries take seconds
            client = mlflow.MlflowClient(self.uri)
            if self.metrics:
                client.log_batch(self.run_id, metrics=self.metrics)
                self.metrics, self.waiting = [], []
            while self.files:
                client.log_artifact(self.run_id, *self.files[0])
                self.files.pop(0)
            for key in list(self.tags):
                client.set_tag(self.run_id, key, self.tags.pop(key))
        except (MlflowException, RuntimeError, OSError) as exc:
            log.warning("MLflow did not take %s (%s); kept, to be logged when it answers again", what, _short(exc))

    def unlogged(self) -> str | None:
        """One line naming what never reached the run, or None."""
        missing = self.waiting + [Path(path).name for path, _ in self.files] + list(self.tags)
        if not missing:
            return None
        return (f"MLflow run {self.run_id} in {masked(self.uri)} misses {', '.join(missing)}: its tracking store stopped answering "
                "(the training's own files hold every figure)")


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
