"""The model registry: one version per model file, registered with alias ``challenger``, its
stored files checked before any alias moves to it, and what a version says of itself
(champion_metrics, version_summary). Promotion, which moves ``champion``, is kdas.tracking.promote's.

A registered version is the model's one record: it is logged in the model's training run
(named by the model file), carries its metrics (per test set, attached to the logged model
and to each evaluation dataset), the identity of the data it was trained and evaluated on,
the DVC hashes, the git commit, the training run and, for a student, the teacher version.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from mlflow.tracking import MlflowClient

from kdas.config import check_serving_config
from kdas.io import file_sha256
from kdas.provenance import flatten, git_tags, lineage_tags
from kdas.tracking.promotion import CHALLENGER, CHAMPION, METRIC_TAG, metric_tags
from kdas.tracking.runs import log_metrics, model_run
from kdas.tracking.served import log_segmenter
from kdas.tracking.store import MODEL_FILE_ARTIFACT, get_client, masked, project_dir, read_mlmodel, tracking_uri

SHA_TAG = "kdas.model_sha256"      # the model file's content: one version per file
EVAL_DATA_TAG = "kdas.eval_data"   # what metric.* were measured on
MODEL_BYTES_TAG = "kdas.model_bytes"  # the model file's size: its stored copy is checked before an alias moves


class RegistryError(RuntimeError):
    """A registry operation cannot proceed (nothing to promote or roll back to...)."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    model_uri: str  # models:/<name>/<version>
    existed: bool = False  # the same model file was registered before (a retry): no new version
    model_id: str | None = None  # the MLflow logged model (its metrics, per test set)


def data_key(data: str) -> str:
    """A short key of an evaluation data id, for tag names."""
    return hashlib.sha256(data.encode()).hexdigest()[:12]


def _version_of_file(client: MlflowClient, name: str, sha: str) -> Any | None:
    with contextlib.suppress(MlflowException):
        found = client.search_model_versions(f"name = '{name}' and tag.`{SHA_TAG}` = '{sha}'")
        if found:
            return min(found, key=lambda v: int(v.version))
    return None


def _describe(name: str, config: dict, info: Mapping[str, Any], tags: Mapping[str, str], metrics: Mapping[str, Any]) -> str:
    role = info.get("role", "model")
    how = f", distilled ({info.get('method')}) from {tags.get('kdas.teacher_version') or info.get('teacher') or 'a teacher'}" \
        if info.get("method") not in (None, "none") else ""
    scores = ", ".join(f"{k.split('/')[0]} {float(v):.4f}" for k, v in flatten(metrics, sep="/").items() if k.endswith("/meanDic"))
    return (f"kdas {role}: Polyp-PVT on {config['backbone']} at {tags.get('kdas.image_size')} px{how}. "
            f"Trained on {info.get('train_data', 'unknown data')} (MLflow run {info.get('mlflow_run_id', 'unknown')}, "
            f"git {tags.get('mlflow.source.git.commit', 'unknown')[:12]}); best val meanDic {info.get('val_meanDic', float('nan')):.4f} "
            f"at epoch {info.get('epoch', '?')}. Test meanDic (calibrated maps) on {tags.get(EVAL_DATA_TAG)}: {scores}.")


def register_model(
    model_file: str | Path,
    name: str,
    metrics: Mapping[str, Any],
    *,
    evaluation_data: str,
    teacher_name: str | None = None,
    serving_config: Mapping[str, Any],
    onnx: bool = True,
) -> RegisteredVersion:
    """Register `model_file` as a version of `name` with alias ``challenger``; idempotent.

    `metrics`: ``{test set: {metric: value}}`` as measured on `evaluation_data` (an id from
    kdas.evaluation.evaluate). A model file registered before (same content) gets no second version:
    the existing one is returned, with ``challenger`` pointed at it unless it is the champion
    (two registrations at once: the later version is deleted and both return the first).
    `serving_config`: what the served version enforces, kdas.config.serving_limits
    (and optionally device, batch_size, runtime). `onnx`: log the fp32 ONNX export with the
    version (kdas.serving.export), for onnxruntime serving.
    """
    from kdas.checkpoint import load_model

    model_file = Path(model_file)
    config = check_serving_config(serving_config)  # fail before touching the registry
    if config["runtime"] == "onnxruntime" and not onnx:
        raise ValueError("serving_config runtime onnxruntime needs the ONNX export: register with onnx=True")
    loaded = load_model(model_file)  # (a bad file, too)
    client = get_client()
    sha = file_sha256(model_file)
    existing = _version_of_file(client, name, sha)
    if existing is not None:
        return _registered_before(client, name, existing)

    info = loaded.info
    tags = {**metric_tags(metrics), **git_tags(), **lineage_tags(project_dir()), SHA_TAG: sha, EVAL_DATA_TAG: evaluation_data,
            MODEL_BYTES_TAG: str(model_file.stat().st_size),
            "kdas.arch": loaded.config["arch"], "kdas.backbone": loaded.config["backbone"], "kdas.image_size": str(loaded.image_size),
            "kdas.role": str(info.get("role", "")), "kdas.train_data": str(info.get("train_data", "unknown")),
            "kdas.training_run": str(info.get("mlflow_run_id", "unknown")), "kdas.method": str(info.get("method", ""))}
    if info.get("teacher_sha256") and teacher_name:
        teacher = _version_of_file(client, teacher_name, info["teacher_sha256"])
        tags["kdas.teacher_version"] = f"{teacher_name}/{teacher.version}" if teacher else f"unregistered ({info.get('teacher')})"
    with contextlib.ExitStack() as stack:
        onnx_file = None
        if onnx:  # before any run or version exists: an export failure leaves no trace
            from kdas.serving.export import export_onnx

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            onnx_file = export_onnx(loaded, tmp / f"{model_file.stem}.onnx", source=f"{model_file} (registered as {name})")
            tags["kdas.onnx"] = f"artifacts/{onnx_file.name}"  # its path in the logged model
        role = info.get("role", "model")
        with model_run(info.get("mlflow_run_id"), f"register_{role}", dvc_stage=f"register@{role}", model_sha256=sha) as run:
            logged = log_segmenter(model_file, serving_config=config, onnx_file=onnx_file)
            per_set: dict[str, dict[str, Any]] = {}
            for key, value in flatten(metrics, sep="/").items():
                dataset, _, metric = key.rpartition("/")
                per_set.setdefault(dataset or "all", {})[metric] = value
            for dataset, values in per_set.items():  # attached to the model and to each test set
                log_metrics({f"test/{dataset}/{k}": v for k, v in values.items()}, model_id=logged.model_id,
                            dataset=_evaluation_dataset(dataset, evaluation_data))
            version = mlflow.register_model(logged.model_uri, name, tags=tags)
            source_run = run.info.run_id
    first = _version_of_file(client, name, sha)
    if first is not None and str(first.version) != str(version.version):
        # another registration of this file ran at once (both found none): the first version
        # stays, this one goes, so that a file is one version whatever the store
        client.delete_model_version(name, version.version)
        client.delete_logged_model(logged.model_id)
        return _registered_before(client, name, first)
    client.update_model_version(name, version.version, description=_describe(name, loaded.config, info, tags, metrics))
    check_files(name, version.version)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return RegisteredVersion(name, str(version.version), source_run, f"models:/{name}/{version.version}", model_id=logged.model_id)


def _registered_before(client: MlflowClient, name: str, version: Any) -> RegisteredVersion:
    """The version of a model file registered before: ``challenger`` on it unless it is the champion."""
    if client.get_registered_model(name).aliases.get(CHAMPION) != version.version:
        check_files(name, version.version)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    return RegisteredVersion(name, str(version.version), version.run_id, f"models:/{name}/{version.version}", existed=True,
                             model_id=getattr(version, "model_id", None))


def _evaluation_dataset(name: str, evaluation_data: str) -> Any:
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    # a reference, not the images: which test set, at which content (the data id's hash)
    return MetaDataset(source=HTTPDatasetSource(f"https://kdas.invalid/test-sets/{name}"), name=name,
                       digest=data_key(evaluation_data))


def check_files(name: str, version: str) -> None:
    """Raise RegistryError unless the model files of `name` `version` are all in the artifact
    store (its MLmodel and every artifact it names, the model file at its registered size):
    an alias must never point at a model that cannot load."""
    base = None
    try:
        base = ModelsArtifactRepository.get_underlying_uri(f"models:/{name}/{version}")
        spec = read_mlmodel(base)
        artifacts = spec["flavors"]["python_function"].get("artifacts", {})
        stored: dict[str, int | None] = {}
        for folder in {entry["path"].rpartition("/")[0] for entry in artifacts.values()}:
            for info in mlflow.artifacts.list_artifacts(artifact_uri=f"{base}/{folder}" if folder else base):
                stored[info.path if info.path.startswith(f"{folder}/") or not folder else f"{folder}/{info.path}"] = info.file_size
    except (MlflowException, OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        raise RegistryError(f"'{name}' version {version}: its model files cannot be read from {base or 'the store'} "
                            f"({masked(str(getattr(exc, 'message', None) or exc))}); no alias moves to it") from None
    size = get_client().get_model_version(name, version).tags.get(MODEL_BYTES_TAG)
    for key, entry in artifacts.items():
        expected = int(size) if key == MODEL_FILE_ARTIFACT and size else None
        found = stored.get(entry["path"])
        if not found or (expected is not None and found != expected):
            state = "missing" if found is None else f"{found} bytes, registered {expected}"
            raise RegistryError(f"'{name}' version {version}: its file {entry['path']} in {base} is incomplete ({state}); "
                                "no alias moves to it: register the model again")


def tagged_metrics(tags: Mapping[str, str], prefix: str) -> dict[str, float]:
    """The finite numbers of the tags named `prefix`<key>, by key (metric_tags' inverse)."""
    metrics = {}
    for key, raw in tags.items():
        if key.startswith(prefix):
            with contextlib.suppress(ValueError):
                if math.isfinite(number := float(raw)):
                    metrics[key[len(prefix):]] = number
    return metrics


def check_registered(name: str, version: str, sha256: str, run_id: str | None = None) -> None:
    """That `version` of `name` in this tracking store is the model file of digest `sha256`
    (and was logged by `run_id`): a version number alone says nothing about which model it
    is (another workspace may have registered version 1 of the same name in this store).
    A RegistryError of one line otherwise."""
    client = get_client()
    try:
        found = client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"'{name}' has no version {version} in {masked(tracking_uri())}") from None
    theirs = found.tags.get(SHA_TAG, "")
    if theirs != sha256 or (run_id and found.run_id != run_id):
        raise RegistryError(f"{name} version {version} in {masked(tracking_uri())} is another model (digest {theirs[:12] or 'none'}, "
                            f"run {found.run_id}) than the one this workspace registered (digest {sha256[:12]}, run {run_id})")


def champion_metrics(name: str) -> dict[str, Any] | None:
    """``{"name", "version", "run_id", "data", "metrics": {metric: value}}`` of the champion,
    or None when `name` is not registered or has no champion."""
    client = get_client()
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    return {"name": name, "version": str(version.version), "run_id": version.run_id, "data": version.tags.get(EVAL_DATA_TAG),
            "metrics": tagged_metrics(version.tags, METRIC_TAG)}


def version_summary(uri: str) -> str | None:
    """One line on the registered version a ``models:/`` URI names (for predict's output)."""
    if not uri.startswith("models:/"):
        return None
    client = get_client()
    target = uri[len("models:/"):]
    with contextlib.suppress(MlflowException, ValueError):
        if "@" in target:
            name, alias = target.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = target.rsplit("/", 1)
            version = client.get_model_version(name, number)
        tags = version.tags
        return (f"{name} version {version.version}: {tags.get('kdas.backbone', '?')} at {tags.get('kdas.image_size', '?')} px, "
                f"trained on {tags.get('kdas.train_data', 'unknown data')} (run {tags.get('kdas.training_run', '?')}), "
                f"test meanDic {tags.get(METRIC_TAG + 'meanDic', '?')} on {tags.get(EVAL_DATA_TAG, '?')}")
    return None
