"""load_params: the file read, validated against the schema and checked beyond what one
field's type can say."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from kdas.config.errors import ParamsError, bounds, number, one_line
from kdas.config.reading import read_yaml
from kdas.config.schema import DATASET_NAME, DEFAULT_PARAMS, MODEL_NAME, Params, TrainParams
from kdas.stride import OUTPUT_STRIDE


@functools.cache
def _params_schema() -> TypeAdapter[Params]:
    return TypeAdapter(Params)


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
    lo, hi = bounds(TrainParams.__pydantic_fields__["image_size"])
    if not isinstance(size, int) or isinstance(size, bool) or not lo <= size <= hi:
        raise ParamsError(f"{where} = {size!r} is out of range [{number(lo)}, {number(hi)}]")


def check_image_size(size: Any, where: str) -> None:
    """check_size_range, and a multiple of the models' output stride."""
    check_size_range(size, where)
    if size % OUTPUT_STRIDE:
        below = size // OUTPUT_STRIDE * OUTPUT_STRIDE
        raise ParamsError(f"{where} = {size} must be a multiple of {OUTPUT_STRIDE} "
                          f"(nearest: {max(below, OUTPUT_STRIDE)} or {below + OUTPUT_STRIDE})")


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    raw = read_yaml(path)
    try:
        params = _params_schema().validate_python(raw)
    except ValidationError as exc:
        raise ParamsError(one_line(exc, str(path))) from None
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
        raise ParamsError(one_line(exc, where, cls, key)) from None
