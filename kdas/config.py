"""params.yaml read once into typed objects.

Every default lives in params.yaml; the pydantic dataclasses here give it types and ranges
(beside each field), so a key that is missing, misspelt, of the wrong type or out of range
fails at load time, as one line naming the file and the key, before any data is read. They
validate the same way when code builds them (`DistillParams("none", ...)`,
`dataclasses.replace`). Named profiles (`profiles:` in params.yaml) are sets of dotted keys
that `kdas params use NAME` writes into the file.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

from kdas.stride import OUTPUT_STRIDE

DEFAULT_PARAMS = Path("params.yaml")
# A dataset is one plain folder under data/raw: no path, no '.', '..' (`kdas data import --name`, data.datasets)
DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# A registered model's name goes into MLflow search filters between quotes: no quote, no space
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# params.yaml holds ~200 values; YAML aliases can make a few lines stand for billions (an
# "alias bomb": kdas's loader shares them, DVC's expands them and runs out of memory)
MAX_YAML_VALUES = 10_000

# Values as YAML typed them: '1e-4' (text to YAML) is no float, true is no int, "yes" no
# bool; an int is a float (lr: 1). Sections are mappings, and unknown keys are refused.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
Fraction = Annotated[Float, Field(ge=0, le=1)]
Seed = Annotated[Int, Field(ge=0, le=2**32 - 1)]
# A network input size: also all a model file or an ONNX export may declare (check_size_range)
ImageSize = Annotated[Int, Field(ge=32, le=4096)]
# Validators are built on first use: importing kdas.config (for check_image_size, say) stays cheap
SCHEMA = ConfigDict(extra="forbid", defer_build=True)


@dataclass(frozen=True, config=SCHEMA)
class SynthParams:
    n_images: Annotated[Int, Field(ge=3, le=10**6)]
    size: Annotated[Int, Field(ge=32, le=4096)]
    empty_fraction: Fraction
    seed: Seed


@dataclass(frozen=True, config=SCHEMA)
class SplitParams:
    val_fraction: Annotated[Float, Field(ge=0, le=0.9)]
    test_fraction: Annotated[Float, Field(ge=0, le=0.9)]
    seed: Seed


@dataclass(frozen=True, config=SCHEMA)
class DataParams:
    datasets: list[Str]  # each a DATASET_NAME (checked at load)
    synth: SynthParams
    split: SplitParams


@dataclass(frozen=True, config=SCHEMA)
class ValidationParams:
    min_size: Annotated[Int, Field(ge=1, le=10**5)]
    max_size: Annotated[Int, Field(ge=1, le=10**5)]
    max_nonbinary_fraction: Fraction
    max_foreground_fraction: Fraction
    near_duplicate_distance: Annotated[Int, Field(ge=0, le=64)]


@dataclass(frozen=True, config=SCHEMA)
class RoleModel:
    """One role's model: `arch` a kdas.models name (`polyp_pvt` takes any timm `backbone`),
    `weights` none | hub | a local backbone file, the backbone's stochastic depth."""

    arch: Str
    backbone: Str | None
    weights: Str
    drop_path_rate: Fraction


@dataclass(frozen=True, config=SCHEMA)
class ModelParams:
    teacher: RoleModel
    student: RoleModel


@dataclass(frozen=True, config=SCHEMA)
class TeacherTraining:
    """Where the teacher's training differs from the student's (None: as `train`)."""

    epochs: Annotated[Int | None, Field(ge=1, le=10**5, description="as train.epochs")]
    image_size: Annotated[Int | None, Field(ge=32, le=4096, description="as train.image_size")]  # a multiple of OUTPUT_STRIDE


@dataclass(frozen=True, config=SCHEMA)
class TrainParams:
    image_size: ImageSize  # a multiple of OUTPUT_STRIDE (checked at load)
    batch_size: Annotated[Int, Field(ge=1, le=10**5)]
    epochs: Annotated[Int, Field(ge=1, le=10**5)]
    lr: Annotated[Float, Field(ge=1e-12, le=10)]
    weight_decay: Annotated[Float, Field(ge=0, le=10)]
    grad_clip: Annotated[Float, Field(ge=1e-9, le=1e9)]
    multiscale: list[Float]  # non-empty, each in [0.25, 4] (checked at load)
    lr_decay: Annotated[Float, Field(ge=1e-9, le=1)]
    decay_epochs: Annotated[Int, Field(ge=1, le=10**6)]
    patience: Annotated[Int, Field(ge=1, le=10**6)]
    seed: Seed
    workers: Annotated[Int, Field(ge=0, le=256)]
    nproc_per_node: Annotated[Int, Field(ge=1, le=1024)]
    amp: Bool
    compile: Bool
    augment: Bool
    weighted_bce: Bool
    teacher: TeacherTraining = field(default_factory=lambda: TeacherTraining(epochs=None, image_size=None))

    def for_role(self, role: str) -> TrainParams:
        """The settings `role` trains with: the teacher's own epochs and input size where set."""
        if role != "teacher":
            return self
        return dataclasses.replace(self, epochs=self.teacher.epochs or self.epochs, image_size=self.teacher.image_size or self.image_size)


@dataclass(frozen=True, config=SCHEMA)
class DistillParams:
    """`method`: a module of kdas/training/methods (none, kd, sgm, kdas, ...); `seed`: the
    student's. Every other key of params.yaml's `distill` is one method's own section
    (`distill.kd.temperature`), held in `settings` and typed by that method's `Params` when
    its task is built (kdas.training.methods.method_params): each method owns its settings,
    and `dvc exp run -S distill.method=...` switches between them without removing keys."""

    method: Str
    seed: Seed
    settings: dict[Str, dict[Str, Any]] = field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "settings" not in data:
            data = {**{k: data[k] for k in ("method", "seed") if k in data},
                    "settings": {k: v for k, v in data.items() if k not in ("method", "seed")}}
        return data


@dataclass(frozen=True, config=SCHEMA)
class EvaluateParams:
    batch_size: Annotated[Int, Field(ge=1, le=10**5)]
    grid_size: Annotated[Int, Field(ge=1, le=100)]


@dataclass(frozen=True, config=SCHEMA)
class GateParams:
    metric: Str
    margin: Fraction
    floor: Fraction


@dataclass(frozen=True, config=SCHEMA)
class RegisterParams:
    student_name: Str  # each a MODEL_NAME (checked at load)
    teacher_name: Str
    onnx: Bool
    retries: Annotated[Int, Field(ge=0, le=100)]
    retry_delay: Annotated[Float, Field(ge=0, le=3600)]
    gate: GateParams


@dataclass(frozen=True, config=SCHEMA)
class ServeParams:
    max_rows: Annotated[Int, Field(ge=1, le=10**4)]
    max_pixels: Annotated[Int, Field(ge=1, le=10**10)]
    threshold: Fraction


@dataclass(frozen=True, config=SCHEMA)
class ServingConfig(ServeParams):
    """What a served version enforces and how it runs (its MLmodel's model_config):
    params.yaml's `serve` budget, at most `max_side` (validation.max_size) a side per image,
    and the runtime: the kdas model file on torch, or its ONNX export on onnxruntime."""

    max_side: Annotated[Int, Field(ge=1, le=10**5)]
    device: Str = "auto"
    batch_size: Annotated[Int, Field(ge=1, le=10**4)] = 8
    runtime: Literal["torch", "onnxruntime"] = "torch"


@dataclass(frozen=True, config=SCHEMA)
class ReferenceParams:
    frames: Annotated[Int, Field(ge=0, le=10**4)]  # 0: no reference profile in the model file
    components: Annotated[Int, Field(ge=1, le=64)]
    thumbnails: Annotated[Int, Field(ge=0, le=32)]


@dataclass(frozen=True, config=SCHEMA)
class MonitorParams:
    reference: ReferenceParams  # what training writes into the model file (the train stages' params)
    drift_share: Annotated[Float, Field(gt=0, le=1)]


@dataclass(frozen=True, config=SCHEMA)
class Params:
    data: DataParams
    validation: ValidationParams
    model: ModelParams
    train: TrainParams
    distill: DistillParams
    evaluate: EvaluateParams
    register: RegisterParams
    serve: ServeParams
    monitor: MonitorParams
    profiles: dict[Str, dict[Str, Any]] = field(default_factory=dict)


class ParamsError(ValueError):
    """params.yaml does not match the schema."""


@functools.cache
def _params_schema() -> TypeAdapter[Params]:
    return TypeAdapter(Params)


def _field(loc: tuple[Any, ...], root: type = Params) -> FieldInfo | None:
    """The field of `root` at `loc` (an error's location: section, key, ...), if it is one."""
    cls, info = root, None
    for part in loc:
        known = getattr(cls, "__pydantic_fields__", {})
        if not isinstance(part, str) or part not in known:
            return None
        info = known[part]
        cls = info.annotation
    return info


def _bounds(info: FieldInfo) -> tuple[Any, Any]:
    """A field's [ge, le] range, as declared beside it."""
    return next(m.ge for m in info.metadata if hasattr(m, "ge")), next(m.le for m in info.metadata if hasattr(m, "le"))


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


_TYPE_NAMES = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool", "list_type": "list",
               "dict_type": "a mapping", "dataclass_type": "a mapping", "dataclass_args_type": "a mapping"}


def _dotted(loc: tuple[Any, ...], prefix: str = "") -> str:
    """An error's location as the key in params.yaml: train.lr, train.multiscale[0] (under
    `prefix`, the dotted key of the mapping validated)."""
    return (prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc if p not in ("[key]", "settings"))).lstrip(".")


def _one_line(exc: ValidationError, where: str, root: type = Params, prefix: str = "") -> str:
    """The first of pydantic's errors as one line naming the file and the dotted key; unknown
    keys first, all those of one mapping together (pydantic lists them last, one by one)."""
    errors = exc.errors(include_url=False)
    unknown = [e for e in errors if e["type"] in ("unexpected_keyword_argument", "extra_forbidden", "invalid_key")]
    err = (unknown or errors)[0]
    loc, value, kind = err["loc"], err["input"], err["type"]
    key, section = _dotted(loc, prefix), f"{where}: {_dotted(loc[:-1], prefix)}: " if loc[:-1] or prefix else f"{where}: "
    if unknown:
        names = sorted((e["loc"][-1] for e in unknown if e["loc"][:-1] == loc[:-1]), key=str)
        mapping = _field(loc[:-1], root)
        known = sorted(getattr(mapping.annotation if mapping else root, "__pydantic_fields__", {}))
        return f"{section}unknown key(s) {names}; known: {known}"
    if kind == "missing":
        return f"{section}missing key '{loc[-1]}'"
    info = _field(loc, root)
    nullable = info is not None and type(None) in get_args(info.annotation)
    if kind in ("greater_than_equal", "less_than_equal") and info is not None:
        lo, hi = _bounds(info)
        if nullable:  # the description says what null means
            bound = f"at least {_num(lo)}" if value < lo else f"at most {_num(hi)}"
            return f"{where}: {key} = {value!r} must be null ({info.description}) or {bound}"
        return f"{where}: {key} = {value!r} is out of range [{_num(lo)}, {_num(hi)}]"
    if kind == "literal_error" and info is not None:
        return f"{where}: {key} must be one of {', '.join(get_args(info.annotation))}, not {value!r}"
    if kind in _TYPE_NAMES:
        expected = _TYPE_NAMES[kind] + " or null" * nullable
        hint = "; e.g. write 1.0e-4, not '1e-4' (YAML reads that as text)" if kind == "float_type" and isinstance(value, str) else ""
        return f"{where}: {key + ': ' if key else ''}expected {expected}, got {value!r} ({type(value).__name__}){hint}"
    return f"{where}: {key}: {err['msg']}"


def _check_values(params: Params, where: str) -> None:
    """What one field's type cannot say: lists' items, names, sizes against the stride."""
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
    for role in ("teacher", "student"):  # timm would try the hub for an hf-hub: backbone (36 s to fail offline)
        spec = getattr(params.model, role)
        if (spec.backbone or "").startswith(("hf-hub:", "hf_hub:")) and spec.weights != "hub":
            raise ParamsError(f"{where}: model.{role}.backbone = {spec.backbone!r} is on the model hub, but model.{role}.weights is "
                              f"{spec.weights!r}: name a timm backbone (weights from a local file), or set weights: hub if the "
                              "network is meant")
    check_image_size(params.train.image_size, f"{where}: train.image_size")
    if params.train.teacher.image_size is not None:
        check_image_size(params.train.teacher.image_size, f"{where}: train.teacher.image_size")


def check_size_range(size: Any, where: str) -> None:
    """A network input size within train.image_size's range: also all a model file or an
    ONNX export may declare (a file declaring 20000 px made a predict allocate gigabytes, 0
    gave a cv2 traceback). Torch-free, for the onnxruntime path."""
    lo, hi = _bounds(TrainParams.__pydantic_fields__["image_size"])
    if not isinstance(size, int) or isinstance(size, bool) or not lo <= size <= hi:
        raise ParamsError(f"{where} = {size!r} is out of range [{_num(lo)}, {_num(hi)}]")


def check_image_size(size: Any, where: str) -> None:
    """check_size_range, and a multiple of the models' output stride."""
    check_size_range(size, where)
    if size % OUTPUT_STRIDE:
        below = size // OUTPUT_STRIDE * OUTPUT_STRIDE
        raise ParamsError(f"{where} = {size} must be a multiple of {OUTPUT_STRIDE} "
                          f"(nearest: {max(below, OUTPUT_STRIDE)} or {below + OUTPUT_STRIDE})")


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
    except UnicodeDecodeError:
        raise ParamsError(f"{path}: not a text file (not UTF-8); params.yaml is YAML text") from None
    except RecursionError:
        raise ParamsError(f"{path}: nested too deeply to be a params file") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits (Python's int-from-string limit)
        raise ParamsError(f"{path}: not a params file ({str(exc).splitlines()[0][:200]})") from None
    if _expanded_values(raw) > MAX_YAML_VALUES:
        raise ParamsError(f"{path}: its YAML aliases expand to more than {MAX_YAML_VALUES} values (an alias bomb?); write the "
                          "values out instead")
    try:
        params = _params_schema().validate_python(raw)
    except ValidationError as exc:
        raise ParamsError(_one_line(exc, str(path))) from None
    _check_values(params, str(path))
    return params


def parse_section(cls: type, raw: Any, key: str, where: str = str(DEFAULT_PARAMS)) -> Any:
    """`raw`, the mapping at dotted `key` of params.yaml, as the typed `cls` (a section that
    its own module declares, such as a method's); a ParamsError of one line otherwise."""
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{where}: {key}: expected a mapping, got {raw!r}")
    try:
        return TypeAdapter(cls).validate_python(dict(raw))
    except ValidationError as exc:
        raise ParamsError(_one_line(exc, where, cls, key)) from None


def serving_limits(serve: ServeParams, max_side: int) -> dict[str, Any]:
    """What a served model enforces (kdas.tracking's serving_config): the request budget and
    threshold of `serve`, and at most `max_side` (validation.max_size) a side per image."""
    return {"max_side": max_side, **asdict(serve)}


def check_serving_config(given: Mapping[str, Any]) -> dict[str, Any]:
    """A served model's config checked against ServingConfig, its runtime defaults filled in;
    a ValueError of one line naming the key otherwise."""
    try:
        return asdict(TypeAdapter(ServingConfig).validate_python(dict(given)))
    except ValidationError as exc:
        raise ValueError(_one_line(exc, "serving_config", ServingConfig)) from None


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
        for depth, key in enumerate(parents):
            if not isinstance(node, Mapping):
                raise ParamsError(f"{path}: unknown key '{dotted}' ({'.'.join(parents[:depth])} is a value, not a section)")
            if key not in node:
                raise ParamsError(f"{path}: unknown key '{dotted}' ({'.'.join(parents[:depth]) or 'the file'} has no section '{key}')")
            node = node[key]
        if not isinstance(node, Mapping):
            raise ParamsError(f"{path}: unknown key '{dotted}' ({'.'.join(parents)} is a value, not a section)")
        if leaf not in node:
            raise ParamsError(f"{path}: unknown key '{dotted}'")
        if node[leaf] != value:
            node[leaf] = value
            changed = True
    if changed:  # checked before it replaces the file: a bad value leaves params.yaml as it was
        from kdas.io import atomic_path

        with atomic_path(path) as tmp:
            with tmp.open("w") as fh:
                yml.dump(doc, fh)
            try:
                load_params(tmp)
            except ParamsError as exc:
                raise ParamsError(str(exc).replace(str(tmp), str(path)) + " (not written)") from None
    return changed
