"""The tracking store: where runs and the registry live, and the kdas experiment."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import yaml
from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

from kdas.io import unreachable

EXPERIMENT_ENV = "KDAS_EXPERIMENT"
DEFAULT_EXPERIMENT = "kdas"
STORE_DIR = "mlflow"  # relative to the project (the working directory)
MODEL_FILE_ARTIFACT = "model_file"  # the kdas model file's name among a logged model's artifacts


def read_mlmodel(base: str) -> dict:
    """The MLmodel spec of the logged model at artifact URI `base` (MlflowException when it is
    not there, yaml.YAMLError when it does not parse)."""
    return yaml.safe_load(mlflow.artifacts.load_text(f"{base}/MLmodel"))
# MLflow 3 opens an experiment in its GenAI view unless told this is model training
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def project_dir() -> Path:
    return Path.cwd()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the project's sqlite store (``mlflow/mlflow.db``)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{local_store().resolve()}"


def masked(text: str) -> str:
    """A URI, or a message naming one (MLflow's errors name the URL they called), fit to print:
    a password in it (postgresql://user:secret@host/db) shown as ***."""
    return re.sub(r"(//[^/:@\s]+):[^/@\s]*@", r"\1:***@", text)


def local_store() -> Path | None:
    """The project's sqlite file when no MLFLOW_TRACKING_URI is set (it may not exist yet)."""
    return None if os.environ.get("MLFLOW_TRACKING_URI") else project_dir() / STORE_DIR / "mlflow.db"


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


def get_client() -> MlflowClient:
    """The client of the store; the project's store folder is made here, where MLflow is
    about to write (a read-only look, e.g. `kdas predict` outside a project, must not)."""
    store = local_store()
    if store is not None:
        store.parent.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri()
    check_reachable(uri)
    if masked(uri) != uri:  # MLflow's "View run ... at <the URI>" links would print its password
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)  # the fluent API (runs, log_model) reads the global
    with _schema_lock(uri):
        client = MlflowClient(uri)
    _opened.add(uri)
    return client


_opened: set[str] = set()  # the stores this process has opened (a SQLite one: its schema is in place)


def _schema_lock(uri: str) -> contextlib.AbstractContextManager:
    """A lock next to a SQLite store's file while this process first opens it: MLflow creates or
    migrates the schema then, and two processes doing it at once raced (one failed: "duplicate
    column name: step"); the next one finds the schema in place."""
    database = make_url(uri).database if uri.startswith("sqlite:") and uri not in _opened else None
    if not database or database == ":memory:":
        return contextlib.nullcontext()
    return FileLock(f"{database}.lock")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer fails in seconds, with what to do (MLflow's
    own client retries for minutes, then raises a traceback)."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    if why := unreachable(uri, timeout):
        raise RuntimeError(f"the MLflow tracking server {masked(uri)} does not answer ({why}); start it "
                           "(see mlflow/README.md) or unset MLFLOW_TRACKING_URI to use the project's own store")


def store_error(exc: BaseException) -> str | None:
    """One line for an error of the tracking store itself (MLflow's, its database's beneath,
    or its artifact store's), else None: the command layer prints it instead of a traceback."""
    module = type(exc).__module__
    text = masked(" ".join(str(exc).split("[SQL:")[0].split())[:300])  # sqlalchemy appends the statement and a link
    if module.startswith(("botocore.", "boto3.", "s3transfer.")):  # the client writes to S3 itself
        return (f"the MLflow artifact store ({os.environ.get('MLFLOW_S3_ENDPOINT_URL', 'S3')}) failed: {text}; "
                "check that it is up, then run the command again")
    if not isinstance(exc, MlflowException) and not module.startswith("sqlalchemy."):
        return None
    if "mlflow-artifacts" in text:  # the server proxies artifacts: the store behind it failed
        return (f"the MLflow server {masked(tracking_uri())} could not store artifacts (is its artifact store up?): {text}")
    return f"the MLflow tracking store {masked(tracking_uri())} failed: {text}"


def ensure_experiment(client: MlflowClient | None = None) -> str:
    """The id of the kdas experiment, created on first use."""
    client = client or get_client()
    name = experiment_name()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        # sqlite without a server would put artifacts in ./mlruns: keep them in the store dir
        location = None
        if client.tracking_uri.startswith("sqlite:"):
            location = (project_dir() / STORE_DIR / "artifacts").resolve().as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException as exc:  # another stage created it meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        raise RuntimeError(
            f"MLflow experiment '{name}' is deleted: restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or set {EXPERIMENT_ENV}"
        )
    return exp.experiment_id
