"""An exported kdas model on onnxruntime, without PyTorch: a deployment needs onnxruntime,
numpy and OpenCV only (kdas.serving.export makes the file).

``OnnxSegmenter``: the same images-in, maps-out contract as ``kdas.serving.inference.Segmenter``
(resize to the input size, logits upsampled bilinearly to each image's size, then
prepared). ``read_metadata``: the model's description that travels in the ONNX metadata
(``kdas.*`` keys).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kdas.config import check_size_range
from kdas.maps import prepare, resize

FORMAT = "kdas-onnx/1"
INPUT = "image"
OUTPUTS = ("logits", "map")
META = "kdas."  # prefix of the metadata keys


def _upsample(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """S x S float32 -> H x W, bilinear with half-pixel centres (torch's
    ``F.interpolate(mode="bilinear", align_corners=False)``, no antialiasing)."""
    if logits.shape == (height, width):
        return logits.astype(np.float32, copy=True)
    return cv2.resize(logits.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def check_image(image: Any, index: int = 0) -> np.ndarray:
    """An H x W x 3 uint8 RGB array, or a ValueError saying what it is instead."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image {index}: expected an H x W x 3 uint8 RGB array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image {index}: expected an H x W x 3 uint8 RGB array, got {image.dtype} of shape {image.shape}")
    return image


def providers_for(device: str = "auto") -> list[str]:
    """onnxruntime execution providers for a kdas device name: auto (CUDA when onnxruntime
    has it, else CPU), cpu, cuda."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(f"device {device!r}: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu); "
                               f"available: {', '.join(available)}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    raise ValueError(f"unknown device {device!r} for onnxruntime; expected auto, cpu or cuda")


def _session(path: Path, providers: Sequence[str] | None = None, threads: int | None = None) -> Any:
    import onnxruntime as ort

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file (make one with `kdas export --model MODEL --out {path.name}`)")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # onnxruntime raises its own unrelated types (InvalidProtobuf, Fail...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {first[:200]})") from None


def _parse_metadata(path: Path, props: dict[str, str]) -> dict[str, Any]:
    if props.get(META + "format") != FORMAT:
        raise ValueError(f"{path}: not a kdas ONNX export (no '{META}format: {FORMAT}' metadata); "
                         "export a kdas model with `kdas export`")
    meta: dict[str, Any] = {}
    for key, value in props.items():
        if key.startswith(META):
            try:
                meta[key[len(META):]] = json.loads(value)
            except json.JSONDecodeError:
                meta[key[len(META):]] = value
    try:
        meta["image_size"] = int(meta["image_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: a damaged kdas ONNX export (no integer '{META}image_size' metadata)") from None
    check_size_range(meta["image_size"], f"{path}: {META}image_size")  # 60000 px made one predict allocate 10.8 GB
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``kdas.*`` metadata of an exported file (without the prefix, values decoded)."""
    path = Path(path)
    session = _session(path)
    return _parse_metadata(path, dict(session.get_modelmeta().custom_metadata_map))


def network_input(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """HxWx3 uint8 images -> B x 3 x size x size float32 RGB in [0, 1] (what the graph takes)."""
    arrays = [resize(check_image(im, i), size) for i, im in enumerate(images)]
    return np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)


class OnnxSegmenter:
    """``kdas.serving.inference.Segmenter`` on onnxruntime: HxWx3 uint8 images in, HxW maps out."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None):
        self.path = Path(path)
        self.session = _session(self.path, providers_for(device), threads)
        self.metadata = _parse_metadata(self.path, dict(self.session.get_modelmeta().custom_metadata_map))
        self.image_size: int = self.metadata["image_size"]
        names = {o.name for o in self.session.get_outputs()}
        if INPUT not in {i.name for i in self.session.get_inputs()} or "logits" not in names:
            raise ValueError(f"{self.path}: a damaged kdas ONNX export (needs input '{INPUT}' and output 'logits')")

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> "OnnxSegmenter":
        return cls(path, device)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """B x 3 x S x S float32 in [0, 1] -> B x 1 x S x S logits (P1 + P2)."""
        return self.session.run(["logits"], {INPUT: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The network input for `images`: resized, B x 3 x S x S float32 in [0, 1]."""
        return network_input(images, self.image_size)

    def logits(self, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """HxWx3 uint8 images -> HxW float32 logits of P1 + P2 at each image's size."""
        images = list(images)
        for i, im in enumerate(images):  # all of them before any runs
            check_image(im, i)
        out: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            for im, logit in zip(chunk, self.run(self.batch(chunk))):
                out.append(_upsample(logit[0], *im.shape[:2]))
        return out

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 8, preparation: str = "calibrated") -> list[np.ndarray]:
        """HxWx3 uint8 images -> HxW float32 maps in [0, 1] (calibrated: probabilities)."""
        return [prepare(logit, preparation) for logit in self.logits(images, batch_size)]
