"""params.yaml's schema: one frozen pydantic dataclass per section, ranges beside each field.
They validate the same way when code builds them (`DistillParams("none", ...)`,
`dataclasses.replace`)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, Field, Strict, model_validator
from pydantic.dataclasses import dataclass

DEFAULT_PARAMS = Path("params.yaml")
# A dataset is one plain folder under data/raw: no path, no '.', '..' (`kdas data import --name`, data.datasets)
DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# A registered model's name goes into MLflow search filters between quotes: no quote, no space
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

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
class GateRule:
    """One named rule of `register.gate`: `rule` names its kind, a rule of kdas.tracking.rules,
    which types the rule's other keys (held in `settings`) when the gate is applied
    (kdas.tracking.rules.gate_rules): each kind owns its settings, as a method does."""

    rule: Str
    settings: dict[Str, Any]

    @model_validator(mode="before")
    @classmethod
    def _settings(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "settings" not in data:
            data = {**({"rule": data["rule"]} if "rule" in data else {}), "settings": {k: v for k, v in data.items() if k != "rule"}}
        return data


# register.gate: the rules a challenger must all pass to become champion, by name
GateParams = dict[Str, GateRule]


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
