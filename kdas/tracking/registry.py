"""The model registry: one version per model file, aliases ``challenger`` and
``champion``, promotion by the pure gate of kdas.tracking.promotion on like-for-like evidence.

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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from mlflow.tracking import MlflowClient

from kdas.config import GateParams, check_serving_config
from kdas.io import file_sha256
from kdas.provenance import flatten, git_tags, lineage_tags
from kdas.tracking.promotion import CHALLENGER, CHAMPION, METRIC_TAG, Decision, Evidence, decide, metric_tags
from kdas.tracking.runs import log_metrics, model_run
from kdas.tracking.served import log_segmenter
from kdas.tracking.store import MODEL_FILE_ARTIFACT, get_client, masked, project_dir, read_mlmodel, tracking_uri

PREVIOUS_CHAMPION_TAG = "previous_champion"
SHA_TAG = "kdas.model_sha256"      # the model file's content: one version per file
EVAL_DATA_TAG = "kdas.eval_data"   # what metric.* were measured on
REEVAL_TAG = "eval."               # eval.<data key>/<metric>: scores on other evaluation data
MODEL_BYTES_TAG = "kdas.model_bytes"  # the model file's size: its stored copy is checked before an alias moves
DECISION_TAG = "promotion.decision"
# written first by a promote and replaced last: a promote stopped half-way (killed) leaves
# this, never a decision it did not finish, and the next promote of the version finishes it
PENDING = "pending"

#: evaluate a registered version (``models:/NAME/VERSION``) on the current test sets:
#: returns ({metric: mean over the test sets}, evaluation data id)
Evaluator = Callable[[str], tuple[dict[str, float], str]]


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


def _data_key(data: str) -> str:
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
                       digest=_data_key(evaluation_data))


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"no registered model '{name}' in {masked(client.tracking_uri)}") from None
        raise
    return {alias: str(version) for alias, version in model.aliases.items()}


def _record(tags: Mapping[str, str]) -> dict[str, str]:
    """A version's promotion record among its tags."""
    return {k: v for k, v in tags.items() if k.startswith("promotion.") or k == PREVIOUS_CHAMPION_TAG}


@contextlib.contextmanager
def _undone_on_error(client: MlflowClient, name: str, version: str) -> Iterator[None]:
    """If anything fails inside, put every alias of `name` and the promotion record of
    `version` back as they were: no evidence of a move that did not happen."""
    before = _aliases(client, name)
    record = _record(client.get_model_version(name, version).tags)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            now = _aliases(client, name)
            for alias in now.keys() - before.keys():
                client.delete_registered_model_alias(name, alias)
            for alias, number in before.items():
                if now.get(alias) != number:
                    client.set_registered_model_alias(name, alias, number)
            written = _record(client.get_model_version(name, version).tags)
            for key in written.keys() - record.keys():
                client.delete_model_version_tag(name, version, key)
            for key, value in record.items():
                if written.get(key) != value:
                    client.set_model_version_tag(name, version, key, value)
        raise


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


def _number(raw: str | None) -> float | None:
    try:
        score = float(raw) if raw is not None else None
    except ValueError:
        return None
    return score if score is not None and math.isfinite(score) else None


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


def _evidence(client: MlflowClient, name: str, version: str, metric: str, data: str | None = None) -> Evidence:
    """A version's score on `data` (default: the data it was registered with)."""
    tags = client.get_model_version(name, version).tags
    own = tags.get(EVAL_DATA_TAG)
    if data is None or data == own:
        return Evidence(version, _number(tags.get(METRIC_TAG + metric)), own)
    score = _number(tags.get(f"{REEVAL_TAG}{_data_key(data)}/{metric}"))
    return Evidence(version, score, data if score is not None else own)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def promote(name: str, gate: GateParams, evaluate: Evaluator | None = None, version: str | None = None) -> Decision:
    """Apply the gate (kdas.tracking.promotion.decide) to `version` of `name`.

    A pipeline passes the version it registered: the ``challenger`` alias (the default, for
    a person at a terminal) is last-writer-wins, and another run may have moved it since.
    Callers serialise promotes of one model (the flow holds a lock the Prefect server keeps).

    Like for like: when the champion was scored on other data than the challenger, it is
    first evaluated on the challenger's test sets by `evaluate` (its scores recorded on its
    version as ``eval.<data>/<metric>`` tags); without `evaluate`, or if that fails, the
    decision says so and does not promote. The decision and its evidence (both data ids)
    are written as ``promotion.*`` tags on the challenger: ``promotion.decision`` is
    ``pending`` first and the decision last, after ``champion`` moved (the replaced champion
    remembered as ``previous_champion``). A failure puts aliases and tags back as they were;
    a promote killed after the move leaves ``pending`` on the champion, and promoting that
    version again finishes its record. The champion never moves to a version whose files
    are incomplete (check_files).
    """
    client = get_client()
    aliases = _aliases(client, name)
    challenger = version or aliases.get(CHALLENGER)
    if challenger is None:
        raise RegistryError(f"'{name}' has no '{CHALLENGER}' version: register one first")
    try:
        record = _record(client.get_model_version(name, challenger).tags)
    except MlflowException:
        raise RegistryError(f"'{name}' has no version {challenger}") from None
    champion = aliases.get(CHAMPION)
    if champion == challenger and record.get(DECISION_TAG) == PENDING:
        client.set_model_version_tag(name, challenger, DECISION_TAG, "promoted")
        return _recorded_promotion(challenger, record)
    ours = _evidence(client, name, challenger, gate.metric)
    theirs = _evidence(client, name, champion, gate.metric, ours.data) if champion else None
    if theirs is not None and champion != challenger and theirs.data != ours.data and evaluate is not None:
        with contextlib.suppress(Exception):  # cannot evaluate: decide() reports the data mismatch
            means, data = evaluate(f"models:/{name}/{champion}")
            for metric, value in means.items():
                client.set_model_version_tag(name, champion, f"{REEVAL_TAG}{_data_key(data)}/{metric}", repr(float(value)))
            client.set_model_version_tag(name, champion, f"{REEVAL_TAG}{_data_key(data)}.data", data)
            theirs = _evidence(client, name, champion, gate.metric, ours.data)
    decided = decide(ours, theirs, gate)
    if champion == challenger:  # nothing to decide; keep the evidence of its promotion
        return decided
    if decided.promoted:
        check_files(name, challenger)
    evidence = {
        "promotion.reason": decided.reason[:5000],
        "promotion.metric": gate.metric,
        "promotion.margin": repr(gate.margin),
        "promotion.floor": repr(gate.floor),
        "promotion.challenger_score": repr(decided.challenger_score),
        "promotion.champion_score": repr(decided.champion_score),
        "promotion.challenger_data": str(decided.challenger_data),
        "promotion.champion_data": str(decided.champion_data),
        "promotion.champion_before": str(champion),
        "promotion.time": _now(),
    }
    with _undone_on_error(client, name, challenger):
        client.set_model_version_tag(name, challenger, DECISION_TAG, PENDING)
        for key, value in evidence.items():
            client.set_model_version_tag(name, challenger, key, value)
        if decided.promoted:
            client.set_model_version_tag(name, challenger, PREVIOUS_CHAMPION_TAG, str(champion))
            client.set_registered_model_alias(name, CHAMPION, challenger)
        client.set_model_version_tag(name, challenger, DECISION_TAG, "promoted" if decided.promoted else "rejected")
    return decided


def _recorded_promotion(version: str, record: Mapping[str, str]) -> Decision:
    """The decision a promote stopped after moving ``champion`` had written as evidence."""
    def value(key: str) -> str | None:
        raw = record.get(f"promotion.{key}")
        return None if raw in (None, "None") else raw

    return Decision(True, version, value("champion_before"), _number(value("challenger_score")), _number(value("champion_score")),
                    f"{value('reason')} (the record of this promotion, stopped after the champion moved, is completed now)",
                    value("challenger_data"), value("champion_data"))


def rollback(name: str) -> str:
    """Put ``champion`` back on the version it replaced; returns that version.

    The demoted version loses the ``challenger`` alias too (if it had it), so that a
    re-run of `promote` does not promote it again.
    """
    client = get_client()
    aliases = _aliases(client, name)
    current = aliases.get(CHAMPION)
    if current is None:
        raise RegistryError(f"'{name}' has no '{CHAMPION}': nothing to roll back")
    previous = client.get_model_version(name, current).tags.get(PREVIOUS_CHAMPION_TAG)
    if not previous or previous == "None":
        raise RegistryError(
            f"'{name}' champion version {current} replaced no earlier champion: nothing to roll back to"
        )
    try:
        client.get_model_version(name, previous)
    except MlflowException:
        raise RegistryError(f"'{name}' version {previous} (the previous champion) no longer exists") from None
    with _undone_on_error(client, name, current):
        note = f"{_now()}: champion back to version {previous}"
        client.set_model_version_tag(name, current, "promotion.rolled_back", note)
        client.set_registered_model_alias(name, CHAMPION, previous)
        if aliases.get(CHALLENGER) == current:
            client.delete_registered_model_alias(name, CHALLENGER)
    return previous


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
    metrics = {}
    for key, value in version.tags.items():
        if key.startswith(METRIC_TAG):
            with contextlib.suppress(ValueError):
                metrics[key[len(METRIC_TAG) :]] = float(value)
    return {"name": name, "version": str(version.version), "run_id": version.run_id, "data": version.tags.get(EVAL_DATA_TAG),
            "metrics": metrics}


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
