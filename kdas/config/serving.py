"""What a served model enforces and how it runs: the schema of its MLmodel's model_config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from kdas.config.errors import one_line
from kdas.config.schema import SCHEMA, Int, ServeParams, Str


@dataclass(frozen=True, config=SCHEMA)
class ServingConfig(ServeParams):
    """What a served version enforces and how it runs (its MLmodel's model_config):
    params.yaml's `serve` budget, at most `max_side` (validation.max_size) a side per image,
    and the runtime: the kdas model file on torch, or its ONNX export on onnxruntime."""

    max_side: Annotated[Int, Field(ge=1, le=10**5)]
    device: Str = "auto"
    batch_size: Annotated[Int, Field(ge=1, le=10**4)] = 8
    runtime: Literal["torch", "onnxruntime"] = "torch"


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
        raise ValueError(one_line(exc, "serving_config", ServingConfig)) from None
