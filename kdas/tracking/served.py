"""The served model: a pyfunc logged as "models from code" around a kdas model file (an
artifact; no pickled torch modules, no cloudpickle): base64 PNG/JPEG in, base64 PNG mask
out (the wire format is kdas.serving.codec's), with a budget per request."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from kdas.config import check_serving_config
from kdas.maps import prepare
from kdas.monitoring.frame_log import FrameLog
from kdas.monitoring.profile import Reference
from kdas.serving.codec import BadImage, check_header, decode, encode_image, image_bytes, png_base64
from kdas.tracking.runs import _require_run
from kdas.tracking.store import MODEL_FILE_ARTIFACT

# What a served version enforces and how it runs (kdas.config.ServingConfig, checked by
# kdas.config.serving_config) is written into its MLmodel (model_config), so that it is
# visible and stays fixed for that version: the budget of one request, checked from the
# image headers before any pixel is decoded (a 10 KB PNG can declare 4096 x 4096).

ONNX_ARTIFACT = "onnx_model"  # its ONNX export (kdas.serving.export; run by kdas.serving.onnx_runtime), logged with it by register_model


def bad_input(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """Polyp segmentation as an MLflow pyfunc.

    Input: a DataFrame with a column ``image``: base64-encoded PNG or JPEG bytes, one image
    per row. Output: a DataFrame with ``mask`` (base64 PNG, 0/255, the image's own size)
    and ``foreground_fraction``. Bad rows raise ``MlflowException`` (INVALID_PARAMETER_VALUE,
    HTTP 400 when served) naming the row (0-based) and the problem.
    """

    def load_context(self, context: Any) -> None:
        self.config = check_serving_config(context.model_config or {})
        if self.config["runtime"] == "onnxruntime":  # no torch needed
            from kdas.serving.onnx_runtime import OnnxSegmenter

            if ONNX_ARTIFACT not in context.artifacts:
                raise MlflowException(f"runtime onnxruntime, but the model has no '{ONNX_ARTIFACT}' artifact")
            self.segmenter = OnnxSegmenter.load(context.artifacts[ONNX_ARTIFACT], device=self.config["device"])
            self.frame_log = FrameLog.from_environ(self.segmenter.image_size, self.config["threshold"], None)  # no embedding
            return
        from kdas.serving.inference import Segmenter

        self.segmenter = Segmenter.load(context.artifacts[MODEL_FILE_ARTIFACT], device=self.config["device"])
        reference = self.segmenter.reference and Reference.from_payload(self.segmenter.reference, MODEL_FILE_ARTIFACT)
        self.frame_log = FrameLog.from_environ(self.segmenter.image_size, self.config["threshold"], reference)

    def _maps(self, images: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
        """The calibrated maps; with the frame log on, each frame recorded (with its embedding on torch)."""
        if self.frame_log is None:
            return self.segmenter.predict(images, batch_size=batch_size)
        embeddings = None
        if hasattr(self.segmenter, "logits_with_embeddings"):
            logits, embeddings = self.segmenter.logits_with_embeddings(images, batch_size)
            probs = [prepare(logit, "calibrated") for logit in logits]
        else:
            probs = self.segmenter.predict(images, batch_size=batch_size)
        self.frame_log.record(images, probs, embeddings)
        return probs

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        cfg = self.config
        if not isinstance(model_input, pd.DataFrame):
            raise bad_input(f"expected a DataFrame with a column 'image', got {type(model_input).__name__}")
        if "image" not in model_input.columns:
            raise bad_input(f"expected a column 'image' (base64 PNG/JPEG); got columns {list(model_input.columns)}")
        # check the whole request before any pixel is decoded: over budget or bad, it costs nothing
        if len(model_input) > cfg["max_rows"]:
            raise bad_input(f"request too large: {len(model_input)} rows (at most {cfg['max_rows']} per request)")
        try:
            blobs = [image_bytes(value, row) for row, value in enumerate(model_input["image"].tolist())]
            pixels = 0
            for row, data in enumerate(blobs):
                pixels += check_header(data, row, cfg["max_side"], cfg["max_pixels"])
                if pixels > cfg["max_pixels"]:
                    raise BadImage(f"request too large: rows 0 to {row} declare {pixels} pixels (at most {cfg['max_pixels']} "
                                   f"per request); send fewer or smaller images")
            masks: list[str] = []
            fractions: list[float] = []
            step = int(cfg["batch_size"])
            for start in range(0, len(blobs), step):  # decode per batch: bounded memory
                images = [decode(data, start + i) for i, data in enumerate(blobs[start : start + step])]
                for prob in self._maps(images, step):
                    mask = prob >= cfg["threshold"]
                    masks.append(png_base64(mask))
                    fractions.append(float(mask.mean()))
        except BadImage as exc:
            raise bad_input(str(exc)) from None
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
# Written by kdas.tracking.served.log_segmenter: MLflow builds the served model from this file.
import mlflow
from kdas.tracking.served import SegmenterModel

mlflow.models.set_model(SegmenterModel())
"""

# The distributions the served model imports at run time (alternatives in a tuple).
_RUNTIME_DISTRIBUTIONS = (
    "torch", "torchvision", "timm", "numpy", "pandas", "pillow",
    ("opencv-python-headless", "opencv-python"), "albumentations", "PyYAML", "pydantic",
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


def log_segmenter(model_file: str | Path, serving_config: Mapping[str, Any], name: str = "model",
                  onnx_file: str | Path | None = None) -> Any:
    """Log a kdas model file as a pyfunc model in the active run; returns MLflow's ModelInfo.

    The model directory holds: the model file (artifact), its ONNX export if `onnx_file`
    is given (artifact ``onnx_model``: served on onnxruntime with ``{"runtime":
    "onnxruntime"}``), the code file above, a copy of the ``kdas`` package (``code_paths``:
    the model serves with the code it was logged with), the signature, a PNG input example,
    pinned pip requirements and `serving_config`: the limits of kdas.config.serving_limits,
    and optionally device, batch_size and runtime (kdas.config.ServingConfig's defaults).
    """
    _require_run()
    config = check_serving_config(serving_config)
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
