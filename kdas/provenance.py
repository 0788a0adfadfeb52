"""Where a run's inputs came from, as plain values (no MLflow): the git commit, the DVC
hashes of the data and stage inputs, the machine. kdas.tracking tags runs with them;
pipelines/ reads them too, instead of parsing dvc.lock itself."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml


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


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Nested metrics flattened to ``{"<set>/<metric>": number}``; what is not a finite number
    is dropped with a warning (MLflow would store NaN as a score and the gate compare it)."""
    clean: dict[str, float] = {}
    for key, value in flatten(metrics, sep="/").items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            warnings.warn(f"metric {key}={value!r} is not a finite number: dropped", stacklevel=3)
            continue
        clean[key] = number
    return clean


def safe_key(key: str) -> str:
    # MLflow names allow alphanumerics, _ - . space : /
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)[:250]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path.cwd(), capture_output=True, text=True, timeout=20)
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


def read_yaml(path: Path) -> dict[str, Any]:
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
    root = root or Path.cwd()
    hashes: dict[str, str] = {}
    for dvc_file in sorted(root.glob("data/raw/*.dvc")):
        for out in read_yaml(dvc_file).get("outs") or []:
            if isinstance(out, dict) and out.get("md5") and out.get("path"):
                rel = (dvc_file.parent / out["path"]).relative_to(root)
                hashes[rel.as_posix()] = out["md5"]
    for stage in (read_yaml(root / "dvc.lock").get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            if isinstance(out, dict) and out.get("md5") and out.get("path"):
                hashes[Path(out["path"]).as_posix()] = out["md5"]
    return hashes


def stage_deps(root: Path, stage: str) -> list[str]:
    """The deps of `stage` (``evaluate@student`` for a foreach item), from dvc.yaml
    (current) or else dvc.lock."""
    base, _, item = stage.partition("@")
    for name in ("dvc.yaml", "dvc.lock"):
        stages = read_yaml(root / name).get("stages") or {}
        entry = stages.get(stage) or {}
        if not entry and item and isinstance(stages.get(base), dict):  # dvc.yaml's foreach: its `do`, ${item} filled in
            entry = {"deps": [str(d).replace("${item}", item) for d in (stages[base].get("do") or {}).get("deps") or []]}
        deps = entry.get("deps") or []
        if deps:
            return [d["path"] if isinstance(d, dict) else str(d) for d in deps]
    return []


def tracked_hash(path: str, hashes: Mapping[str, str]) -> str | None:
    """md5 of `path`, or of the tracked folder that contains it."""
    path = Path(path).as_posix().rstrip("/")
    best = max((p for p in hashes if path == p or path.startswith(p + "/")), key=len, default=None)
    return hashes[best] if best else None


def lineage_tags(root: Path, paths: Iterable[str | Path] = (), stage: str | None = None) -> dict[str, str]:
    """Tags naming the DVC md5 of what a run read: each of `paths`, the deps of `stage`
    (dvc.yaml / dvc.lock) and every raw dataset (``data/raw/*.dvc``). Paths DVC does not
    track are left out."""
    hashes = dvc_hashes(root)
    tags: dict[str, str] = {}
    for path, md5 in hashes.items():
        if path.startswith("data/raw/"):
            tags[f"dvc.raw.{Path(path).name}"] = md5
    wanted = [os.fspath(p) for p in paths] + (stage_deps(root, stage) if stage else [])
    for path in wanted:
        md5 = tracked_hash(path, hashes)
        if md5:
            tags[f"dvc.dep.{safe_key(Path(path).as_posix())}"] = md5
    return tags
