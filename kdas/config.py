"""params.yaml read once into typed objects.

Every default lives in params.yaml; the dataclasses here only give it types, so a key
that is missing, misspelt, of the wrong type or out of range fails at load time, with the
key named, before any data is read. Named profiles (`profiles:` in params.yaml) are sets of
dotted keys that `kdas params use NAME` writes into the file.
"""

from __future__ import annotations

import dataclasses
import re
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from kdas.methods import ATTENTIONS, METHODS
from kdas.stride import OUTPUT_STRIDE

DEFAULT_PARAMS = Path("params.yaml")
# A dataset is one plain folder under data/raw: no path, no '.', '..' (`kdas data import --name`, data.datasets)
DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# A registered model's name goes into MLflow search filters between quotes: no quote, no space
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# params.yaml holds ~200 values; YAML aliases can make a few lines stand for billions (an
# "alias bomb": kdas's loader shares them, DVC's expands them and runs out of memory)
MAX_YAML_VALUES = 10_000


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
class RoleModel:
    """One role's model: `arch` a kdas.models name (`polyp_pvt` takes any timm `backbone`),
    `weights` none | hub | a local backbone file, the backbone's stochastic depth."""

    arch: str
    backbone: str | None
    weights: str
    drop_path_rate: float


@dataclass(frozen=True)
class ModelParams:
    teacher: RoleModel
    student: RoleModel


@dataclass(frozen=True)
class TeacherTraining:
    """Where the teacher's training differs from the student's (None: as `train`)."""

    epochs: int | None
    image_size: int | None


@dataclass(frozen=True)
class TrainParams:
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
    compile: bool
    augment: bool
    weighted_bce: bool
    teacher: TeacherTraining = TeacherTraining(epochs=None, image_size=None)

    def for_role(self, role: str) -> TrainParams:
        """The settings `role` trains with: the teacher's own epochs and input size where set."""
        if role != "teacher":
            return self
        return dataclasses.replace(self, epochs=self.teacher.epochs or self.epochs, image_size=self.teacher.image_size or self.image_size)


@dataclass(frozen=True)
class DistillParams:
    method: str
    attention: str
    alpha: float
    tau: float
    pool_stride: int
    seed: int


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
class ServeParams:
    max_rows: int
    max_pixels: int
    threshold: float


@dataclass(frozen=True)
class Params:
    data: DataParams
    validation: ValidationParams
    model: ModelParams
    train: TrainParams
    distill: DistillParams
    evaluate: EvaluateParams
    register: RegisterParams
    serve: ServeParams
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)


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
    hints = get_type_hints(cls)
    for name, f in known.items():
        if name not in raw:
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                continue
            raise ParamsError(f"{where}: missing key '{name}'")
        sub = _SUBTYPES.get((cls, name))
        kwargs[name] = _build(sub, raw[name], f"{where}.{name}") if sub else _typed(raw[name], hints[name], f"{where}.{name}")
    return cls(**kwargs)


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` if it is of type `hint` (ints pass as floats), else a ParamsError naming the key."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _typed(value, option, where)
            except ParamsError:
                pass
    elif origin is list:
        if isinstance(value, list):
            return [_typed(v, args[0], f"{where}[{k}]") for k, v in enumerate(value)]
    elif origin is dict or hint is Any:
        if hint is Any or isinstance(value, dict):
            return value
    elif hint is type(None):
        if value is None:
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    name = getattr(hint, "__name__", str(hint)).replace("NoneType", "null")
    raise ParamsError(f"{where}: expected {name}, got {value!r} ({type(value).__name__}); e.g. write 1.0e-4, not '1e-4' (YAML reads that as text)"
                      if isinstance(value, str) and hint is float else f"{where}: expected {name}, got {value!r} ({type(value).__name__})")


# Ranges checked at load time, so that a bad value stops a command before any data is read.
_RANGES: dict[str, tuple[float, float]] = {
    "data.synth.n_images": (3, 1e6), "data.synth.size": (32, 4096), "data.synth.empty_fraction": (0, 1),
    "data.split.val_fraction": (0, 0.9), "data.split.test_fraction": (0, 0.9),
    "validation.min_size": (1, 1e5), "validation.max_size": (1, 1e5), "validation.max_nonbinary_fraction": (0, 1),
    "validation.max_foreground_fraction": (0, 1), "validation.near_duplicate_distance": (0, 64),
    "model.teacher.drop_path_rate": (0, 1), "model.student.drop_path_rate": (0, 1),
    "train.image_size": (32, 4096), "train.batch_size": (1, 1e5), "train.epochs": (1, 1e5), "train.lr": (1e-12, 10),
    "train.weight_decay": (0, 10), "train.grad_clip": (1e-9, 1e9), "train.lr_decay": (1e-9, 1), "train.decay_epochs": (1, 1e6),
    "train.patience": (1, 1e6), "train.seed": (0, 2**32 - 1), "train.workers": (0, 256), "train.nproc_per_node": (1, 1024),
    "distill.alpha": (0, 1), "distill.tau": (1e-6, 1e3), "distill.pool_stride": (1, 64), "distill.seed": (0, 2**32 - 1),
    "evaluate.batch_size": (1, 1e5), "evaluate.grid_size": (1, 100), "register.gate.floor": (0, 1), "register.gate.margin": (0, 1),
    "serve.max_rows": (1, 1e4), "serve.max_pixels": (1, 1e10), "serve.threshold": (0, 1),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "distill.method": METHODS,
    "distill.attention": ATTENTIONS,
}


def _check_values(params: Params, where: str) -> None:
    def get(dotted: str) -> Any:
        value: Any = params
        for key in dotted.split("."):
            value = getattr(value, key)
        return value

    for key, (lo, hi) in _RANGES.items():
        if not lo <= get(key) <= hi:
            raise ParamsError(f"{where}: {key} = {get(key)!r} is out of range [{lo:g}, {hi:g}]")
    for key, choices in _CHOICES.items():
        if get(key) not in choices:
            raise ParamsError(f"{where}: {key} must be one of {', '.join(choices)}, not {get(key)!r}")
    if not params.train.multiscale or any(not 0.25 <= s <= 4 for s in params.train.multiscale):
        raise ParamsError(f"{where}: train.multiscale must be a non-empty list of scales in [0.25, 4], e.g. [0.75, 1.0, 1.25]")
    for name in params.data.datasets:
        if not DATASET_NAME.fullmatch(name):
            raise ParamsError(f"{where}: data.datasets: {name!r} is not a dataset name (a folder under data/raw: lower-case "
                              "letters, digits, '.', '_' or '-', no path)")
    for key in ("student_name", "teacher_name"):
        if not MODEL_NAME.fullmatch(getattr(params.register, key)):
            raise ParamsError(f"{where}: register.{key} = {getattr(params.register, key)!r}: use letters, digits, '.', '_' "
                              "or '-' (at most 100)")
    check_image_size(params.train.image_size, f"{where}: train.image_size")
    teacher = params.train.teacher
    if teacher.epochs is not None and not 1 <= teacher.epochs <= _RANGES["train.epochs"][1]:
        raise ParamsError(f"{where}: train.teacher.epochs = {teacher.epochs!r} must be null (as train.epochs) or at least 1")
    if teacher.image_size is not None:
        check_image_size(teacher.image_size, f"{where}: train.teacher.image_size")


def check_size_range(size: Any, where: str) -> None:
    """A network input size within train.image_size's range: also all a model file or an
    ONNX export may declare (a file declaring 20000 px made a predict allocate gigabytes, 0
    gave a cv2 traceback). Torch-free, for the onnxruntime path."""
    lo, hi = _RANGES["train.image_size"]
    if not isinstance(size, int) or isinstance(size, bool) or not lo <= size <= hi:
        raise ParamsError(f"{where} = {size!r} is out of range [{lo:g}, {hi:g}]")


def check_image_size(size: Any, where: str) -> None:
    """check_size_range, and a multiple of the models' output stride."""
    check_size_range(size, where)
    if size % OUTPUT_STRIDE:
        below = size // OUTPUT_STRIDE * OUTPUT_STRIDE
        raise ParamsError(f"{where} = {size} must be a multiple of {OUTPUT_STRIDE} "
                          f"(nearest: {max(below, OUTPUT_STRIDE)} or {below + OUTPUT_STRIDE})")


_SUBTYPES: dict[tuple[type, str], type] = {
    (Params, "data"): DataParams,
    (DataParams, "synth"): SynthParams,
    (DataParams, "split"): SplitParams,
    (Params, "validation"): ValidationParams,
    (Params, "model"): ModelParams,
    (ModelParams, "teacher"): RoleModel,
    (ModelParams, "student"): RoleModel,
    (Params, "train"): TrainParams,
    (TrainParams, "teacher"): TeacherTraining,
    (Params, "distill"): DistillParams,
    (Params, "evaluate"): EvaluateParams,
    (Params, "register"): RegisterParams,
    (RegisterParams, "gate"): GateParams,
    (Params, "serve"): ServeParams,
}


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (YAML forbids it; PyYAML
    would keep the last one silently, and DVC refuses the file)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} given twice (lines {seen[key]} and {line})")
                seen[key] = line
        return super().construct_mapping(node, deep)


def _expanded_values(raw: Any) -> int:
    """How many values `raw` holds with its aliases expanded, counted up to MAX_YAML_VALUES + 1."""
    count, todo = 0, [raw]
    while todo and count <= MAX_YAML_VALUES:
        value = todo.pop()
        count += 1
        if isinstance(value, dict):
            todo += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            todo += value
    return count


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found (run kdas from the project root, or pass --params)")
    try:
        with path.open() as fh:
            raw = yaml.load(fh, Loader=_StrictLoader) or {}  # noqa: S506 (a safe loader)
    except _DuplicateKey as exc:
        raise ParamsError(f"{path}: {exc}; a key may appear once per mapping") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if _expanded_values(raw) > MAX_YAML_VALUES:
        raise ParamsError(f"{path}: its YAML aliases expand to more than {MAX_YAML_VALUES} values (an alias bomb?); write the "
                          "values out instead")
    params = _build(Params, raw, str(path))
    _check_values(params, str(path))
    return params


def serving_limits(serve: ServeParams, max_side: int) -> dict[str, Any]:
    """What a served model enforces (kdas.tracking's serving_config): the request budget and
    threshold of `serve`, and at most `max_side` (validation.max_size) a side per image."""
    return {"max_side": max_side, **asdict(serve)}


def profile_updates(params: Params, name: str) -> dict[str, Any]:
    """The dotted keys a named profile (params.yaml `profiles`) sets."""
    if name not in params.profiles:
        raise ParamsError(f"unknown profile {name!r}; params.yaml defines: {', '.join(params.profiles) or 'none'}")
    return dict(params.profiles[name])


def use_profile(name: str, path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Write a profile's keys into params.yaml (as `dvc exp run -S` would): the file then
    says what runs, and DVC sees every changed key. Returns the keys set."""
    updates = profile_updates(load_params(path), name)
    set_params(updates, path)
    return updates


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
