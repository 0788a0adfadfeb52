"""Model references: a path or an MLflow model URI (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``runs:/ID/model``) to a local kdas model file."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

from kdas.tracking.store import MODEL_FILE_ARTIFACT, get_client, local_store, masked, read_mlmodel, tracking_uri

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # scheme:/... (a 2+ letter scheme: no C:\ drive)


def is_model_uri(ref: str | Path) -> bool:
    """Whether `ref` is a URI (``models:/...``, ``runs:/...``), not a local path."""
    return isinstance(ref, str) and bool(_URI.match(ref))


def model_cache_dir() -> Path:
    """Where `resolve_model_file` keeps model files it downloaded:
    ``$XDG_CACHE_HOME/kdas/models`` (``~/.cache/kdas/models`` by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "kdas" / "models"


def resolve_model_file(ref: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The local kdas model file that `ref` names.

    `ref` is a path (returned as is) or an MLflow model URI: ``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION``, ``runs:/RUN_ID/model`` (a model logged by `log_segmenter`,
    e.g. through `register_model`). Only the model file (the ``model_file`` artifact) is
    downloaded, into `cache_dir` (default `model_cache_dir()`), under a key of the logged
    model's storage location: a registered version's file is fetched once, and an alias that
    moves resolves to the new version. Raises FileNotFoundError when the path or the URI does
    not exist, or when the model holds no kdas model file.
    """
    if not is_model_uri(ref):
        path = Path(ref)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no such model file (train one with `kdas train ...`, "
                "or give a registered model as models:/NAME@ALIAS, e.g. models:/kdas-teacher@champion)"
            )
        return path
    uri = str(ref).rstrip("/")
    store = local_store()
    if store is not None and not store.exists():  # no store here: say so, and do not create one
        raise FileNotFoundError(f"{uri}: no MLflow store in {store.parent.resolve()} (run from the project folder, "
                                "set MLFLOW_TRACKING_URI, or give a model file)")
    get_client()  # models:/ and runs:/ resolve against kdas's store
    try:
        # the storage location first: it pins the version an alias points at right now
        base = ModelsArtifactRepository.get_underlying_uri(uri) if uri.startswith("models:/") else uri
        spec = read_mlmodel(base)
    except MlflowException as exc:
        raise FileNotFoundError(f"{uri}: no such MLflow model in {masked(tracking_uri())} ({masked(exc.message)})") from None
    except yaml.YAMLError as exc:
        raise FileNotFoundError(f"{uri}: not an MLflow model (unreadable MLmodel: {exc})") from None
    relative = _model_file_path(spec)
    if relative is None:
        raise FileNotFoundError(
            f"{uri}: an MLflow model without a kdas model file (no '{MODEL_FILE_ARTIFACT}' artifact in "
            "its python_function flavor): give a model logged by kdas (`kdas register`, log_segmenter)"
        )
    cacheable = uri.startswith(("models:/", "runs:/"))  # immutable once logged
    root = Path(cache_dir) if cache_dir is not None else model_cache_dir()
    key = hashlib.sha256(f"{base}/{relative}".encode()).hexdigest()[:24]
    final = root / key / Path(relative).name
    if cacheable and final.is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{base}/{relative}", dst_path=os.fspath(staging), tracking_uri=tracking_uri()
            )
        except MlflowException as exc:
            message = f"{uri}: its kdas model file '{relative}' cannot be downloaded ({masked(exc.message)})"
            raise FileNotFoundError(message) from None
        if not Path(local).is_file():
            raise FileNotFoundError(f"{uri}: its '{MODEL_FILE_ARTIFACT}' artifact '{relative}' is no file")
        os.replace(local, staging / final.name)
        for extra in staging.iterdir():  # folders the download made on the way
            if extra.name != final.name:
                shutil.rmtree(extra, ignore_errors=True)
        if final.parent.exists() and not cacheable:
            shutil.rmtree(final.parent, ignore_errors=True)
        try:
            staging.rename(final.parent)  # atomic: a reader sees no half-written file
        except OSError:  # another process got there first
            if not final.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _model_file_path(spec: Any) -> str | None:
    """The model file's path inside the model directory, from an MLmodel file's content."""
    node: Any = spec
    for key in ("flavors", "python_function", "artifacts", MODEL_FILE_ARTIFACT, "path"):
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node if isinstance(node, str) and node else None
