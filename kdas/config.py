"""params.yaml read once into typed objects.

Every default lives in params.yaml; the dataclasses here only give it types, so a key
that is missing or misspelt fails loudly instead of silently taking a value from code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")


@dataclass(frozen=True)
class SynthParams:
    n_images: int
    size: int
    empty_fraction: float
    seed: int


@dataclass(frozen=True)
class SplitParams:
    val_fraction: float
    test_fraction: float
    seed: int


@dataclass(frozen=True)
class DataParams:
    datasets: list[str]
    synth: SynthParams
    split: SplitParams


@dataclass(frozen=True)
class ValidationParams:
    min_size: int
    max_size: int
    max_nonbinary_fraction: float
    max_foreground_fraction: float
    near_duplicate_distance: int


@dataclass(frozen=True)
class ModelParams:
    teacher: str
    student: str
    pretrained: str


@dataclass(frozen=True)
class TrainParams:
    profile: str
    image_size: int
    batch_size: int
    epochs: int
    lr: float
    weight_decay: float
    grad_clip: float
    multiscale: list[float]
    lr_decay: float
    decay_epochs: int
    patience: int
    seed: int
    workers: int
    nproc_per_node: int
    amp: bool


@dataclass(frozen=True)
class DistillParams:
    method: str
    alpha: float
    tau: float
    pool_stride: int


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    grid_size: int


@dataclass(frozen=True)
class GateParams:
    metric: str
    margin: float
    floor: float


@dataclass(frozen=True)
class RegisterParams:
    student_name: str
    teacher_name: str
    gate: GateParams


@dataclass(frozen=True)
class Params:
    data: DataParams
    validation: ValidationParams
    model: ModelParams
    train: TrainParams
    distill: DistillParams
    evaluate: EvaluateParams
    register: RegisterParams
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ParamsError(ValueError):
    """params.yaml does not match the schema."""


def _build(cls: type, raw: Any, where: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return raw
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, f in known.items():
        if name not in raw:
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                continue
            raise ParamsError(f"{where}: missing key '{name}'")
        sub = _SUBTYPES.get((cls, name))
        kwargs[name] = _build(sub, raw[name], f"{where}.{name}") if sub else raw[name]
    return cls(**kwargs)


_SUBTYPES: dict[tuple[type, str], type] = {
    (Params, "data"): DataParams,
    (DataParams, "synth"): SynthParams,
    (DataParams, "split"): SplitParams,
    (Params, "validation"): ValidationParams,
    (Params, "model"): ModelParams,
    (Params, "train"): TrainParams,
    (Params, "distill"): DistillParams,
    (Params, "evaluate"): EvaluateParams,
    (Params, "register"): RegisterParams,
    (RegisterParams, "gate"): GateParams,
}


def _apply_profile(raw: dict[str, Any]) -> dict[str, Any]:
    """Overlay `profiles.<train.profile>` on `train`; the `cpu` profile is train itself."""
    profile = raw["train"].get("profile", "cpu")
    if profile == "cpu":
        return raw
    profiles = raw.get("profiles", {})
    if profile not in profiles:
        raise ParamsError(f"train.profile: unknown profile '{profile}'; known: cpu, {', '.join(profiles)}")
    return {**raw, "train": {**raw["train"], **profiles[profile]}}


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found (run kdas from the project root, or pass --params)")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    params = _build(Params, _apply_profile(raw), str(path))
    if params.distill.method not in ("none", "sgm", "kdas"):
        raise ParamsError(f"{path}: distill.method must be none, sgm or kdas, not '{params.distill.method}'")
    return params


def set_params(updates: dict[str, Any], path: str | Path = DEFAULT_PARAMS) -> bool:
    """Write dotted keys into params.yaml in place, keeping its comments (what `dvc exp run
    -S` does); returns whether anything changed. The result must still load."""
    from ruamel.yaml import YAML

    path = Path(path)
    yml = YAML()
    yml.preserve_quotes = True
    doc = yml.load(path.read_text())
    changed = False
    for dotted, value in updates.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise ParamsError(f"{path}: unknown key '{dotted}'")
        if node[leaf] != value:
            node[leaf] = value
            changed = True
    if changed:
        from kdas.io import atomic_path

        with atomic_path(path) as tmp, tmp.open("w") as fh:
            yml.dump(doc, fh)
        load_params(path)
    return changed
