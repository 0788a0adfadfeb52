"""Ship a kdas model outside PyTorch: ONNX export and int8 quantisation.

- ``export_onnx(model_file, out)``: the model as ONNX (opset `OPSET`, runs on onnxruntime's
  CPU and CUDA providers) with a dynamic batch axis at the size the model was trained at.
  Input ``image``: B x 3 x S x S RGB in [0, 1] (the normalisation is folded into the graph:
  the model normalises with its own mean/std buffers). Outputs ``logits`` (P1 + P2) and
  ``map`` (sigmoid(P1 + P2)), B x 1 x S x S. The model's description travels in the ONNX
  metadata (``kdas.*`` keys: architecture, backbone, input size, mean/std, kdas version,
  source model file or registry version, precision).
- ``quantize_int8(fp32, out, images)``: static int8 quantisation (QDQ, per-channel weights)
  with onnxruntime, calibrated on `images`; ``calibration_images(manifest, ...)`` draws
  them from the manifest's ``train`` split only, never from a test set.

Running the file is kdas.serving.onnx_runtime's (no torch); torch is imported inside the export functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdas.serving.onnx_runtime import FORMAT, INPUT, META, OUTPUTS, network_input, read_metadata

OPSET = 18  # onnxruntime >= 1.16 runs it on CPU and CUDA


# --------------------------------------------------------------------------- export (torch)


def _source_of(model_file: Any, source: str | None) -> str:
    if source:
        return source
    return str(model_file) if isinstance(model_file, (str, Path)) else "in-memory model"


def export_onnx(model_file: Any, out: str | Path, *, source: str | None = None, opset: int = OPSET) -> Path:
    """Export a kdas model (a model file path or a loaded ``ModelFile``) to ONNX at `out`.

    `source`: what to record as its origin (default: the model file's path), e.g. a
    registry URI. Written atomically; returns `out`.
    """
    import io
    import warnings

    import torch

    from kdas.checkpoint import ModelFile, load_model
    from kdas.io import atomic_path

    loaded: ModelFile = model_file if isinstance(model_file, ModelFile) else load_model(model_file)
    model = loaded.model.cpu().eval()
    size = loaded.image_size

    class _Exported(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            p1, p2 = self.net(image)
            logits = p1 + p2
            return logits, torch.sigmoid(logits)

    # batch 2: torch.export specialises a dimension seen as 1
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    quiet = (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_logging())
    with atomic_path(out) as tmp, quiet[0], quiet[1], quiet[2]:
        warnings.simplefilter("ignore")  # the exporter's progress lines, logs and deprecation notes
        with torch.no_grad():
            program = torch.onnx.export(
                _Exported(model).eval(), (example,), input_names=[INPUT], output_names=list(OUTPUTS), opset_version=opset,
                dynamo=True, dynamic_shapes={"image": {0: torch.export.Dim("batch")}}, verbose=False,
            )
        proto = program.model_proto
        _set_metadata(proto, _metadata(loaded, source=_source_of(model_file, source), precision="fp32"))
        _save(proto, tmp)
    return out


def _metadata(loaded: Any, *, source: str, precision: str) -> dict[str, Any]:
    import kdas

    config = loaded.config
    info = {k: v for k, v in (loaded.info or {}).items() if isinstance(v, (str, int, float, bool))}
    return {
        "format": FORMAT,
        "arch": config["arch"],
        "backbone": config["backbone"],
        "channel": config["channel"],
        "image_size": int(loaded.image_size),
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "normalisation": "in-graph: the input is RGB in [0, 1]; (x - mean) / std happens inside",
        "input": f"{INPUT}: B x 3 x {loaded.image_size} x {loaded.image_size} float32 RGB in [0, 1]",
        "outputs": "logits: P1 + P2; map: sigmoid(P1 + P2); B x 1 x S x S",
        "precision": precision,
        "kdas_version": kdas.__version__,
        "source": source,
        "info": info,
    }


def _set_metadata(proto: Any, meta: dict[str, Any]) -> None:
    keep = [p for p in proto.metadata_props if not p.key.startswith(META)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = META + key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    proto.producer_name = "kdas"
    import kdas

    proto.producer_version = kdas.__version__


def _save(proto: Any, path: Path) -> None:
    import onnx

    if proto.ByteSize() >= 2**31 - 1:
        raise ValueError(f"{path}: the model is over 2 GB, too large for one ONNX file")
    onnx.save_model(proto, str(path))


# --------------------------------------------------------------------------- int8


def calibration_images(manifest: Any, n: int = 32, seed: int = 0) -> list[np.ndarray]:
    """`n` images drawn (seeded) from the manifest's ``train`` split, never from a test set."""
    from kdas.io import read_rgb

    if "split" not in manifest.columns or "image_path" not in manifest.columns:
        raise ValueError("calibration: the manifest needs columns 'split' and 'image_path'")
    train = manifest[manifest["split"] == "train"]
    if train.empty:
        raise ValueError("calibration: the manifest has no 'train' rows (int8 calibrates on the train split only)")
    rows = train.sample(n=min(n, len(train)), random_state=seed)
    return [read_rgb(p) for p in rows["image_path"]]


QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")  # where the time goes; the rest stays fp32 between QDQ pairs


@contextlib.contextmanager
def _quiet_logging(level: int = logging.ERROR) -> Iterator[None]:
    root = logging.getLogger()
    before = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(before)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over preprocessed batches."""

    def __init__(self, batches: list[np.ndarray]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}

    def rewind(self) -> None:  # pragma: no cover - onnxruntime calls it for some methods
        pass


def quantize_int8(fp32: str | Path, out: str | Path, images: Sequence[np.ndarray], *, per_channel: bool = True) -> Path:
    """Static int8 quantisation (QDQ: int8 weights per channel, uint8 activations,
    MinMax calibration on `images`, HxWx3 uint8 arrays drawn from the train split).
    Returns `out`."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from kdas.io import atomic_path

    fp32, out = Path(fp32), Path(out)
    if not images:
        raise ValueError("int8: no calibration images")
    meta = read_metadata(fp32)  # a kdas export, or a clear error
    batches = [network_input([im], meta["image_size"]) for im in images]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        except Exception:  # pre-processing only helps; quantise the plain graph without it
            pre = fp32
        q = Path(tmp) / "int8.onnx"
        with _quiet_logging():  # the quantiser warns per tensor on the root logger
            quantize_static(
                str(pre), str(q), _Reader(batches), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=list(QUANTIZED_OPS), extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        proto = onnx.load_model(str(q))
        _set_metadata(proto, {**{k: v for k, v in meta.items()}, "precision": "int8",
                              "calibration": f"{len(images)} images of the train split (MinMax, QDQ, per-channel weights)",
                              "source": f"{meta.get('source', '')} (int8 of {fp32.name})"})
        with atomic_path(out) as tmp_out:
            _save(proto, tmp_out)
    return out
