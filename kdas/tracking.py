"""Everything kdas tells MLflow: runs, lineage, the served model, the registry.

This is the only module that imports mlflow, so the rest of kdas stays testable without a
tracking store and a change of MLflow API touches one file.

- Runs: ``pipeline_run()`` (the Prefect flow's parent run) and ``stage_run(stage)`` (one
  per DVC stage, nested under the parent through ``KDAS_PARENT_RUN_ID``, which survives
  the ``dvc repro`` subprocesses). Each run carries params, git commit, DVC data hashes
  and system info.
- Model: ``SegmenterModel``, a pyfunc logged as "models from code" around a kdas model
  file (an artifact; no pickled torch modules, no cloudpickle): base64 PNG/JPEG in,
  base64 PNG mask out.
- Registry: ``register_model`` (new version, alias ``challenger``), ``promote`` (the gate
  moves ``champion``), ``rollback``, ``champion_metrics``.
- References: ``resolve_model_file`` turns a path or a model URI (``models:/NAME@ALIAS``,
  ``runs:/ID/model``) into a local kdas model file (only that file is downloaded, cached).

Store: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project>/mlflow/mlflow.db`` with
artifacts in ``<project>/mlflow/artifacts`` (see mlflow/README.md).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from PIL import Image

from kdas.config import GateParams

PARENT_RUN_ENV = "KDAS_PARENT_RUN_ID"
EXPERIMENT_ENV = "KDAS_EXPERIMENT"
DEFAULT_EXPERIMENT = "kdas"
STORE_DIR = "mlflow"  # relative to the project (the working directory)

CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC_TAG = "metric."  # version tags holding the evaluation metrics
PREVIOUS_CHAMPION_TAG = "previous_champion"

# Serving defaults, written into each logged model's MLmodel (model_config) so that what a
# served version enforces is visible and stays fixed for that version. The budget of one
# request, checked from the image headers before any pixel is decoded (a 10 KB PNG can
# declare 4096 x 4096): at most max_rows images, at most max_pixels pixels in all (which
# bounds any one image too), each at most max_side a side.
# runtime: "torch" (the kdas model file) or "onnxruntime" (the ONNX export logged beside it).
SERVING_CONFIG = {"max_side": 4096, "max_rows": 32, "max_pixels": 4 * 4096 * 4096, "threshold": 0.5, "device": "auto",
                  "batch_size": 8, "runtime": "torch"}
RUNTIMES = ("torch", "onnxruntime")

_PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value

MODEL_FILE_ARTIFACT = "model_file"  # the kdas model file's name among a logged model's artifacts
ONNX_ARTIFACT = "onnx_model"  # its ONNX export (kdas.export), logged with it by register_model


# --------------------------------------------------------------------------- store


def project_dir() -> Path:
    return Path.cwd()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the project's sqlite store (``mlflow/mlflow.db``)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = project_dir() / STORE_DIR
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store.resolve() / 'mlflow.db'}"


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


def _client() -> MlflowClient:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # the fluent API (runs, log_model) reads the global
    return MlflowClient(uri)


def ensure_experiment(client: MlflowClient | None = None) -> str:
    """The id of the kdas experiment, created on first use."""
    client = client or _client()
    name = experiment_name()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        # sqlite without a server would put artifacts in ./mlruns: keep them in the store dir
        location = None
        if client.tracking_uri.startswith("sqlite:"):
            location = (project_dir() / STORE_DIR / "artifacts").resolve().as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
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


# --------------------------------------------------------------------------- runs


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
def stage_run(stage: str, params: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """One MLflow run per pipeline stage, named after it.

    Nested under the active run if there is one, else under ``KDAS_PARENT_RUN_ID`` if set.
    An exception marks the run FAILED (and is re-raised).
    """
    with _run(stage, params, kind="stage") as run:
        log_data_lineage(stage=stage)
        yield run


@contextlib.contextmanager
def _run(name: str, params: Mapping[str, Any] | None, kind: str) -> Iterator[Any]:
    client = _client()
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


def flatten(values: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def log_params(params: Mapping[str, Any]) -> None:
    _require_run()
    flat = {k: str(v)[:_PARAM_VALUE_LIMIT] for k, v in flatten(params).items()}
    mlflow.log_params(flat)


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Log numeric metrics (nested dicts flattened with "/"); NaN/inf and non-numbers are
    skipped with a warning (MLflow would store them, and they would poison comparisons)."""
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
        mlflow.log_metrics(clean, step=step)
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


# --------------------------------------------------------------------------- provenance


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=project_dir(), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_tags() -> dict[str, str]:
    """The commit the run's code came from (``mlflow.source.git.commit``, shown by the UI)
    and whether tracked files differed from it; "unknown" outside a git checkout."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"mlflow.source.git.commit": "unknown", "kdas.git.dirty": "unknown"}
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {"mlflow.source.git.commit": commit, "kdas.git.dirty": dirty}


def system_tags() -> dict[str, str]:
    import torch  # here, not at the top: `import kdas.tracking` should not pay for torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "sys.python": platform.python_version(),
        "sys.torch": torch.__version__,
        "sys.cuda_device": cuda,
        "sys.cpu_count": str(os.cpu_count()),
        "sys.platform": platform.platform(),
    }


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def dvc_hashes(root: Path | None = None) -> dict[str, str]:
    """md5 of every DVC-tracked path: ``data/raw/*.dvc`` files and the outs in ``dvc.lock``.

    Outs, not deps: while a stage runs, its own ``dvc.lock`` entry still describes the
    previous run, but the outs of the stages upstream of it are current.
    """
    root = root or project_dir()
    hashes: dict[str, str] = {}
    for dvc_file in sorted(root.glob("data/raw/*.dvc")):
        for out in _read_yaml(dvc_file).get("outs") or []:
            if isinstance(out, dict) and out.get("md5") and out.get("path"):
                rel = (dvc_file.parent / out["path"]).relative_to(root)
                hashes[rel.as_posix()] = out["md5"]
    for stage in (_read_yaml(root / "dvc.lock").get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            if isinstance(out, dict) and out.get("md5") and out.get("path"):
                hashes[Path(out["path"]).as_posix()] = out["md5"]
    return hashes


def _stage_deps(root: Path, stage: str) -> list[str]:
    """The deps of `stage`, from dvc.yaml (current) or else dvc.lock."""
    for name in ("dvc.yaml", "dvc.lock"):
        entry = (_read_yaml(root / name).get("stages") or {}).get(stage) or {}
        deps = entry.get("deps") or []
        if deps:
            return [d["path"] if isinstance(d, dict) else str(d) for d in deps]
    return []


def _tracked_hash(path: str, hashes: Mapping[str, str]) -> str | None:
    """md5 of `path`, or of the tracked folder that contains it."""
    path = Path(path).as_posix().rstrip("/")
    best = max((p for p in hashes if path == p or path.startswith(p + "/")), key=len, default=None)
    return hashes[best] if best else None


def log_data_lineage(paths: Iterable[str | Path] = (), *, stage: str | None = None) -> dict[str, str]:
    """Tag the active run with the DVC md5 of what it read: each of `paths`, the deps of
    `stage` (dvc.yaml / dvc.lock) and every raw dataset (``data/raw/*.dvc``). Paths DVC does
    not track are left out; no DVC files at all is not an error. Returns the tags."""
    _require_run()
    root = project_dir()
    hashes = dvc_hashes(root)
    tags: dict[str, str] = {}
    for path, md5 in hashes.items():
        if path.startswith("data/raw/"):
            tags[f"dvc.raw.{Path(path).name}"] = md5
    wanted = [os.fspath(p) for p in paths] + (_stage_deps(root, stage) if stage else [])
    for path in wanted:
        md5 = _tracked_hash(path, hashes)
        if md5:
            tags[f"dvc.dep.{_safe_key(Path(path).as_posix())}"] = md5
    if tags:
        mlflow.set_tags(tags)
    return tags


def _safe_key(key: str) -> str:
    # MLflow names allow alphanumerics, _ - . space : /
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)[:250]


# --------------------------------------------------------------------------- the served model


def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _image_bytes(value: Any, row: int) -> bytes:
    if not isinstance(value, str):
        raise _bad_input(f"row {row}: 'image' must be a base64-encoded PNG or JPEG string, got {type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") else value  # tolerate data: URIs
    text = "".join(text.split())  # and line-wrapped base64
    if not text:
        raise _bad_input(f"row {row}: 'image' is empty")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_input(f"row {row}: 'image' is not valid base64") from None


def _check_header(data: bytes, row: int, max_side: int, max_pixels: int) -> int:
    """Format and size from the header alone, before any pixel is decoded (a small file
    can claim a huge image); returns the image's pixel count."""
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as im:
            width, height = im.size
    except Image.DecompressionBombError:
        raise _bad_input(f"row {row}: image too large (at most {max_side} px a side, {max_pixels} pixels)") from None
    except Exception as exc:  # PIL raises several unrelated types for bad data
        raise _bad_input(f"row {row}: not a decodable PNG or JPEG image ({type(exc).__name__})") from None
    if width > max_side or height > max_side or width * height > max_pixels:
        raise _bad_input(
            f"row {row}: image too large: {width}x{height} px (at most {max_side} px a side, {max_pixels} pixels)"
        )
    return width * height


def _decode(data: bytes, row: int) -> np.ndarray:
    from kdas.io import ImageReadError, read_rgb  # the training data's decoding path

    try:
        return read_rgb(io.BytesIO(data))  # type: ignore[arg-type]  # PIL reads file objects
    except ImageReadError as exc:
        cause = exc.__cause__ or exc
        raise _bad_input(f"row {row}: not a decodable PNG or JPEG image ({cause})") from None


def _png_base64(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")  # 2-D uint8: mode L
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_image(image: np.ndarray, fmt: str = "PNG") -> str:
    """An HxWx3 (or HxW) uint8 array as the base64 string the served model takes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_mask(text: str) -> np.ndarray:
    """A served mask (base64 PNG) back to an HxW bool array."""
    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        return np.asarray(im.convert("L")) > 127


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """Polyp segmentation as an MLflow pyfunc.

    Input: a DataFrame with a column ``image``: base64-encoded PNG or JPEG bytes, one image
    per row. Output: a DataFrame with ``mask`` (base64 PNG, 0/255, the image's own size)
    and ``foreground_fraction``. Bad rows raise ``MlflowException`` (INVALID_PARAMETER_VALUE,
    HTTP 400 when served) naming the row (0-based) and the problem.
    """

    def load_context(self, context: Any) -> None:
        self.config = {**SERVING_CONFIG, **(context.model_config or {})}
        if self.config["runtime"] == "onnxruntime":  # no torch needed
            from kdas.export import OnnxSegmenter

            if ONNX_ARTIFACT not in context.artifacts:
                raise MlflowException(f"runtime onnxruntime, but the model has no '{ONNX_ARTIFACT}' artifact")
            self.segmenter = OnnxSegmenter.load(context.artifacts[ONNX_ARTIFACT], device=self.config["device"])
            return
        from kdas.inference import Segmenter

        self.segmenter = Segmenter.load(context.artifacts[MODEL_FILE_ARTIFACT], device=self.config["device"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        cfg = self.config
        if not isinstance(model_input, pd.DataFrame):
            raise _bad_input(f"expected a DataFrame with a column 'image', got {type(model_input).__name__}")
        if "image" not in model_input.columns:
            raise _bad_input(f"expected a column 'image' (base64 PNG/JPEG); got columns {list(model_input.columns)}")
        # check the whole request before any pixel is decoded: over budget or bad, it costs nothing
        if len(model_input) > cfg["max_rows"]:
            raise _bad_input(f"request too large: {len(model_input)} rows (at most {cfg['max_rows']} per request)")
        blobs = [_image_bytes(value, row) for row, value in enumerate(model_input["image"].tolist())]
        pixels = 0
        for row, data in enumerate(blobs):
            pixels += _check_header(data, row, cfg["max_side"], cfg["max_pixels"])
            if pixels > cfg["max_pixels"]:
                raise _bad_input(f"request too large: rows 0 to {row} declare {pixels} pixels (at most {cfg['max_pixels']} "
                                 f"per request); send fewer or smaller images")
        masks: list[str] = []
        fractions: list[float] = []
        step = int(cfg["batch_size"])
        for start in range(0, len(blobs), step):  # decode per batch: bounded memory
            images = [_decode(data, start + i) for i, data in enumerate(blobs[start : start + step])]
            for prob in self.segmenter.predict(images, batch_size=step):
                mask = prob >= cfg["threshold"]
                masks.append(_png_base64(mask))
                fractions.append(float(mask.mean()))
        return pd.DataFrame(
            {"mask": pd.Series(masks, dtype=object), "foreground_fraction": pd.Series(fractions, dtype="float64")}
        )


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("string", "mask"), ColSpec("double", "foreground_fraction")]),
)

# "Models from code" (MLflow's recommended way; 3.x refuses to unpickle a cloudpickled
# model by default): the logged model is rebuilt by running this file, which only
# instantiates the class; the weights come from the kdas model file artifact.
_MODEL_CODE = """\
# Written by kdas.tracking.log_segmenter: MLflow builds the served model from this file.
import mlflow
from kdas.tracking import SegmenterModel

mlflow.models.set_model(SegmenterModel())
"""

# The distributions the served model imports at run time (alternatives in a tuple).
_RUNTIME_DISTRIBUTIONS = (
    "torch", "torchvision", "timm", "numpy", "pandas", "pillow",
    ("opencv-python-headless", "opencv-python"), "albumentations", "PyYAML",
)  # fmt: skip


def _pip_requirements(onnx: bool = False) -> list[str]:
    """Pins of what the served model imports, from the running environment (explicit, so
    MLflow need not load the model in a subprocess to infer them)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for names in _RUNTIME_DISTRIBUTIONS + (("onnxruntime", "onnxruntime-gpu"),) * onnx:
        for dist in (names,) if isinstance(names, str) else names:
            try:
                pins.append(f"{dist}=={version(dist)}")
                break
            except PackageNotFoundError:
                continue
    return pins


def _input_example() -> pd.DataFrame:
    """A 64x64 PNG: a bright disc on a reddish background."""
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 28) ** 2 < 15**2
    image = np.zeros((64, 64, 3), np.uint8)
    image[...] = (150, 60, 50)
    image[disc] = (230, 180, 160)
    return pd.DataFrame({"image": [encode_image(image)]})


def _serving_config(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    unknown = set(overrides or {}) - set(SERVING_CONFIG)
    if unknown:
        raise ValueError(f"unknown serving_config key(s) {sorted(unknown)}; known: {sorted(SERVING_CONFIG)}")
    config = {**SERVING_CONFIG, **(overrides or {})}
    if config["runtime"] not in RUNTIMES:
        raise ValueError(f"serving_config runtime {config['runtime']!r}: expected one of {', '.join(RUNTIMES)}")
    return config


def log_segmenter(model_file: str | Path, name: str = "model", serving_config: Mapping[str, Any] | None = None,
                  onnx_file: str | Path | None = None) -> Any:
    """Log a kdas model file as a pyfunc model in the active run; returns MLflow's ModelInfo.

    The model directory holds: the model file (artifact), its ONNX export if `onnx_file`
    is given (artifact ``onnx_model``: served on onnxruntime with ``{"runtime":
    "onnxruntime"}``), the code file above, a copy of the ``kdas`` package (``code_paths``:
    the model serves with the code it was logged with), the signature, a PNG input example,
    pinned pip requirements and the serving limits (`SERVING_CONFIG` updated by
    `serving_config`, e.g. ``{"max_side": ...}``).
    """
    _require_run()
    config = _serving_config(serving_config)
    if config["runtime"] == "onnxruntime" and onnx_file is None:
        raise ValueError("serving_config runtime onnxruntime needs the ONNX export (onnx_file)")
    artifacts = {MODEL_FILE_ARTIFACT: os.fspath(model_file)}
    if onnx_file is not None:
        artifacts[ONNX_ARTIFACT] = os.fspath(onnx_file)
    import kdas

    package_dir = Path(kdas.__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "kdas_segmenter.py"
        code.write_text(_MODEL_CODE)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=code,
            artifacts=artifacts,
            code_paths=[os.fspath(package_dir)],
            model_config=config,
            signature=SIGNATURE,
            input_example=_input_example(),
            pip_requirements=_pip_requirements(onnx=onnx_file is not None),
        )


# --------------------------------------------------------------------------- model references

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
    _client()  # models:/ and runs:/ resolve against kdas's store
    try:
        # the storage location first: it pins the version an alias points at right now
        base = ModelsArtifactRepository.get_underlying_uri(uri) if uri.startswith("models:/") else uri
        spec = yaml.safe_load(mlflow.artifacts.load_text(f"{base}/MLmodel"))
    except MlflowException as exc:
        raise FileNotFoundError(f"{uri}: no such MLflow model in {tracking_uri()} ({exc.message})") from None
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
            message = f"{uri}: its kdas model file '{relative}' cannot be downloaded ({exc.message})"
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


# --------------------------------------------------------------------------- registry


class RegistryError(RuntimeError):
    """A registry operation cannot proceed (nothing to promote or roll back to...)."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    model_uri: str  # models:/<name>/<version>


@dataclass(frozen=True)
class Decision:
    promoted: bool
    challenger: str | None  # version
    champion_before: str | None
    challenger_score: float | None
    champion_score: float | None
    reason: str


def metric_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Version tags for evaluation metrics.

    `metrics` holds per-test-set values as ``{"<set>/<metric>": v}`` (or nested
    ``{set: {metric: v}}``). Each becomes tag ``metric.<set>/<metric>``, and each metric's
    mean over the sets becomes ``metric.<metric>`` (the promotion gate's score) unless the
    caller gave that key itself. Non-finite values are dropped with a warning.
    """
    values: dict[str, float] = {}
    for key, value in flatten(metrics, sep="/").items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            warnings.warn(f"metric {key}={value!r} is not a finite number: not recorded", stacklevel=3)
            continue
        values[key] = number
    per_metric: dict[str, list[float]] = {}
    for key, number in values.items():
        if "/" in key:
            per_metric.setdefault(key.rsplit("/", 1)[1], []).append(number)
    for metric, numbers in per_metric.items():
        values.setdefault(metric, sum(numbers) / len(numbers))
    return {_safe_key(METRIC_TAG + key): repr(number) for key, number in values.items()}


def register_model(
    model_file: str | Path,
    name: str,
    metrics: Mapping[str, Any],
    *,
    run_id: str | None = None,
    serving_config: Mapping[str, Any] | None = None,
    onnx: bool = True,
) -> RegisteredVersion:
    """Log `model_file` as a pyfunc model, register it as a new version of `name`, tag the
    version with its metrics (see `metric_tags`) and point alias ``challenger`` at it.

    The model is logged in run `run_id` if given (resumed), else in the active run, else in
    a new ``register`` stage run. `serving_config`: see `log_segmenter`. `onnx`: export
    the model to ONNX (fp32, `kdas.export`) and log it with the version (artifact
    ``onnx_model``; tag ``kdas.onnx``), so the version can be served on onnxruntime.
    """
    from kdas.checkpoint import load_model

    model_file = Path(model_file)
    serving_config = _serving_config(serving_config)  # fail before touching the registry
    if serving_config["runtime"] == "onnxruntime" and not onnx:
        raise ValueError("serving_config runtime onnxruntime needs the ONNX export: register with onnx=True")
    loaded = load_model(model_file)  # (a bad file, too)
    tags = {**metric_tags(metrics), "kdas.arch": loaded.config["arch"], "kdas.backbone": loaded.config["backbone"], "kdas.image_size": str(loaded.image_size)}
    with contextlib.ExitStack() as stack:
        onnx_file = None
        if onnx:  # before any run or version exists: an export failure leaves no trace
            from kdas.export import export_onnx

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            onnx_file = export_onnx(loaded, tmp / f"{model_file.stem}.onnx", source=f"{model_file} (registered as {name})")
            tags["kdas.onnx"] = f"artifacts/{onnx_file.name}"  # its path in the logged model
        return _register(model_file, name, tags, run_id, serving_config, onnx_file)


def _register(model_file: Path, name: str, tags: dict[str, str], run_id: str | None, serving_config: dict[str, Any],
              onnx_file: Path | None) -> RegisteredVersion:
    client = _client()
    active = mlflow.active_run()
    if run_id and not (active and active.info.run_id == run_id):
        run_cm = mlflow.start_run(run_id=run_id, nested=active is not None)
    elif active:
        run_cm = contextlib.nullcontext(active)
    else:
        run_cm = stage_run("register")
    with run_cm as run:
        info = log_segmenter(model_file, serving_config=serving_config, onnx_file=onnx_file)
        version = mlflow.register_model(info.model_uri, name, tags=tags)
        source_run = run.info.run_id
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return RegisteredVersion(name, str(version.version), source_run, f"models:/{name}/{version.version}")


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"no registered model '{name}' in {client.tracking_uri}") from None
        raise
    return {alias: str(version) for alias, version in model.aliases.items()}


@contextlib.contextmanager
def _aliases_restored_on_error(client: MlflowClient, name: str) -> Iterator[None]:
    """If anything fails inside, put every alias of `name` back where it was."""
    before = _aliases(client, name)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            now = _aliases(client, name)
            for alias in now.keys() - before.keys():
                client.delete_registered_model_alias(name, alias)
            for alias, version in before.items():
                if now.get(alias) != version:
                    client.set_registered_model_alias(name, alias, version)
        raise


def _score(client: MlflowClient, name: str, version: str, metric: str) -> float | None:
    raw = client.get_model_version(name, version).tags.get(METRIC_TAG + metric)
    try:
        score = float(raw) if raw is not None else None
    except ValueError:
        return None
    return score if score is not None and math.isfinite(score) else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _decide(client: MlflowClient, name: str, challenger: str, champion: str | None, gate: GateParams) -> Decision:
    tag = METRIC_TAG + gate.metric
    score = _score(client, name, challenger, gate.metric)
    champ_score = _score(client, name, champion, gate.metric) if champion else None

    def decision(promoted: bool, reason: str) -> Decision:
        return Decision(promoted, challenger, champion, score, champ_score, reason)

    if champion == challenger:
        return decision(False, f"version {challenger} already is the champion")
    if score is None:
        return decision(False, f"challenger version {challenger} has no numeric '{tag}' tag: cannot score it")
    if score < gate.floor:
        return decision(False, f"challenger {gate.metric} {score:.4f} is below the floor {gate.floor}")
    if champion is None:
        return decision(True, f"no champion yet; challenger {gate.metric} {score:.4f} >= floor {gate.floor}")
    if champ_score is None:
        return decision(
            False,
            f"champion version {champion} has no numeric '{tag}' tag: cannot compare (tag it or set the alias by hand)",
        )
    if score < champ_score - gate.margin:
        return decision(
            False,
            f"challenger {gate.metric} {score:.4f} < champion {champ_score:.4f} - margin {gate.margin}",
        )
    return decision(True, f"challenger {gate.metric} {score:.4f} >= champion {champ_score:.4f} - margin {gate.margin}")


def promote(name: str, gate: GateParams) -> Decision:
    """Apply the promotion gate (``register.gate`` in params.yaml) to the ``challenger``
    version of `name`.

    Score: the version's ``metric.<gate.metric>`` tag. Promoted iff score >= floor and
    (no champion, or score >= champion's score - margin). The decision and its evidence
    are written as ``promotion.*`` tags on the challenger either way; on promotion the
    previous champion is remembered (``previous_champion`` tag) and ``champion`` moves,
    last. Any failure leaves the aliases as they were.
    """
    client = _client()
    aliases = _aliases(client, name)
    challenger = aliases.get(CHALLENGER)
    if challenger is None:
        raise RegistryError(f"'{name}' has no '{CHALLENGER}' version: register one first")
    champion = aliases.get(CHAMPION)
    decided = _decide(client, name, challenger, champion, gate)
    if champion == challenger:  # nothing to decide; keep the evidence of its promotion
        return decided
    evidence = {
        "promotion.decision": "promoted" if decided.promoted else "rejected",
        "promotion.reason": decided.reason,
        "promotion.metric": gate.metric,
        "promotion.margin": repr(gate.margin),
        "promotion.floor": repr(gate.floor),
        "promotion.challenger_score": repr(decided.challenger_score),
        "promotion.champion_score": repr(decided.champion_score),
        "promotion.champion_before": str(champion),
        "promotion.time": _now(),
    }
    with _aliases_restored_on_error(client, name):
        for key, value in evidence.items():
            client.set_model_version_tag(name, challenger, key, value)
        if decided.promoted:
            client.set_model_version_tag(name, challenger, PREVIOUS_CHAMPION_TAG, str(champion))
            client.set_registered_model_alias(name, CHAMPION, challenger)
    return decided


def rollback(name: str) -> str:
    """Put ``champion`` back on the version it replaced; returns that version.

    The demoted version loses the ``challenger`` alias too (if it had it), so that a
    re-run of `promote` does not promote it again.
    """
    client = _client()
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
    with _aliases_restored_on_error(client, name):
        note = f"{_now()}: champion back to version {previous}"
        client.set_model_version_tag(name, current, "promotion.rolled_back", note)
        client.set_registered_model_alias(name, CHAMPION, previous)
        if aliases.get(CHALLENGER) == current:
            client.delete_registered_model_alias(name, CHALLENGER)
    return previous


def champion_metrics(name: str) -> dict[str, Any] | None:
    """``{"name", "version", "run_id", "metrics": {metric: value}}`` of the champion, or
    None when `name` is not registered or has no champion."""
    client = _client()
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
    return {"name": name, "version": str(version.version), "run_id": version.run_id, "metrics": metrics}
