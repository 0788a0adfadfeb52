"""params.yaml read once into typed objects.

Every default lives in params.yaml; the pydantic dataclasses of `schema` give it types and
ranges (beside each field), so a key that is missing, misspelt, of the wrong type or out of
range fails at load time, as one line naming the file and the key (`errors`), before any data
is read; `reading` guards the YAML itself, `load` reads and checks the whole file, `profiles`
writes named profiles and keys into it, `serving` is the schema of a served model's config.
"""

from kdas.config.errors import ParamsError
from kdas.config.load import check_image_size, check_size_range, load_params, parse_section
from kdas.config.profiles import profile_updates, set_params, use_profile
from kdas.config.schema import (
    DATASET_NAME,
    DEFAULT_PARAMS,
    MODEL_NAME,
    SCHEMA,
    Bool,
    DataParams,
    DistillParams,
    EvaluateParams,
    Float,
    Fraction,
    GateParams,
    ImageSize,
    Int,
    ModelParams,
    MonitorParams,
    Params,
    ReferenceParams,
    RegisterParams,
    RoleModel,
    Seed,
    ServeParams,
    SplitParams,
    Str,
    SynthParams,
    TeacherTraining,
    TrainParams,
    ValidationParams,
)
from kdas.config.serving import ServingConfig, check_serving_config, serving_limits

__all__ = [
    "Bool", "check_image_size", "check_serving_config", "check_size_range", "DataParams", "DATASET_NAME",
    "DEFAULT_PARAMS", "DistillParams", "EvaluateParams", "Float", "Fraction", "GateParams", "ImageSize",
    "Int", "load_params", "MODEL_NAME", "ModelParams", "MonitorParams", "Params", "ParamsError",
    "parse_section", "profile_updates", "ReferenceParams", "RegisterParams", "RoleModel", "SCHEMA", "Seed",
    "ServeParams", "serving_limits", "ServingConfig", "set_params", "SplitParams", "Str", "SynthParams",
    "TeacherTraining", "TrainParams", "use_profile", "ValidationParams",
]
