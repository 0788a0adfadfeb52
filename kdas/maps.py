"""From a model's logits to the maps people score and ship, with numpy and OpenCV only
(no torch: the onnxruntime path uses it too).

- ``calibrated``: the sigmoid, i.e. the probability a deployed model outputs (an empty
  frame stays empty). predict and serving use it.
- ``published``: as the official Polyp-PVT / KDAS test scripts prepare the maps they
  score: the sigmoid min-max normalised per image to [0, 1] (then saved as 8-bit PNG).
  Published numbers are measured on such maps; compare with papers on these.
"""

from __future__ import annotations

import cv2
import numpy as np

THRESHOLD = 0.5  # a mask from a probability map: the pictures' and `kdas predict`'s (a served model's is serve.threshold)
PREPARATIONS = {
    "calibrated": "sigmoid of the logits upsampled to the image size (what a deployed model outputs)",
    "published": "as the official test scripts: sigmoid of the upsampled logits, min-max normalised per image",
}


def resize(image: np.ndarray, size: int, *, mask: bool = False) -> np.ndarray:
    """To the model's square input size (nearest for masks)."""
    interpolation = cv2.INTER_NEAREST if mask else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def prepare(logits: np.ndarray, preparation: str) -> np.ndarray:
    """HxW logits -> HxW float32 map in [0, 1], prepared as named (see PREPARATIONS)."""
    if preparation not in PREPARATIONS:
        raise ValueError(f"unknown map preparation {preparation!r}; expected one of {', '.join(PREPARATIONS)}")
    # in place, one float32 map: a 9000 px square image's temporaries took gigabytes
    prob = np.negative(logits, dtype=np.float32)
    np.exp(prob, out=prob)
    prob += 1.0
    np.reciprocal(prob, out=prob)
    if preparation == "published":
        low, high = prob.min(), prob.max()
        prob -= low
        prob /= np.float32(high - low + 1e-8)
    return prob
