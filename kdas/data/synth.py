"""`kdas data synth`: deterministic synthetic colonoscopy frames with exact masks.

The embedded default dataset, so the whole pipeline runs on a machine with no data.
Each frame: a dark octagonal field of view, pink-red mucosa with low-frequency texture and
vessels, specular highlights, and 0-3 polyps drawn as shaded, irregular blobs. Polyps are
coloured like the mucosa around them (only a little redder), so a model has to learn
their shape and shading rather than a colour threshold.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from kdas.config import SynthParams
from kdas.io import atomic_dir


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Noise in [0, 1] with features about size/scale pixels wide."""
    coarse = rng.random((scale, scale)).astype(np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return (field - field.min()) / (np.ptp(field) + 1e-6)


def _fov(size: int) -> np.ndarray:
    """The endoscope's octagonal field of view (corners cut at 30%)."""
    c = int(size * 0.3)
    pts = np.array([[c, 0], [size - c, 0], [size, c], [size, size - c], [size - c, size], [c, size], [0, size - c], [0, c]], np.int32)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [pts], 1)
    return mask.astype(bool)


def _blob(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An irregular convex-ish polyp: its mask and a shading field (bright top-left rim)."""
    r = rng.uniform(0.06, 0.22) * size
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    radii = r * (1 + 0.18 * np.sin(angles * rng.integers(2, 4) + rng.uniform(0, 6)) + rng.normal(0, 0.05, angles.size))
    aspect = rng.uniform(0.7, 1.0)
    pts = np.stack([cx + radii * np.cos(angles), cy + aspect * radii * np.sin(angles)], 1).astype(np.int32)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [pts], 1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    light = np.clip(1 - np.hypot(xx - (cx - 0.35 * r), yy - (cy - 0.35 * r)) / (1.6 * r), 0, 1)
    return mask.astype(bool), light


def synth_frame(seed: int, index: int, size: int, empty_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, index])
    fov = _fov(size)
    texture = _smooth_noise(rng, size, 6) * 0.6 + _smooth_noise(rng, size, 24) * 0.4
    base = np.array([205, 95, 85], np.float32) * rng.uniform(0.8, 1.1)
    img = base[None, None, :] * (0.65 + 0.45 * texture[..., None])
    # vessels: thin dark-red random walks
    vessels = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(2, 6)):
        pts = np.cumsum(rng.normal(0, size * 0.05, (12, 2)), 0) + rng.uniform(0, size, 2)
        cv2.polylines(vessels, [pts.astype(np.int32)], False, 1, thickness=int(rng.integers(1, 3)))
    img[vessels.astype(bool)] *= np.array([0.75, 0.55, 0.6], np.float32)
    mask = np.zeros((size, size), bool)
    n_polyps = 0 if rng.random() < empty_fraction else int(rng.choice([1, 1, 1, 2, 3]))
    for _ in range(n_polyps):
        blob, light = _blob(rng, size)
        tint = np.array([1.06, 0.92, 0.95], np.float32) * rng.uniform(0.95, 1.1)
        # a polyp's surface is smoother than the wall around it and lit from one side
        smooth = cv2.GaussianBlur(img, (0, 0), sigmaX=size * 0.03)
        shaded = smooth * tint * (0.65 + 0.7 * light[..., None])
        img = np.where(blob[..., None], shaded, img)
        rim = cv2.morphologyEx(blob.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
        img[rim] *= 0.7  # a darker rim where the polyp rises from the wall
        mask |= blob
    # specular highlights on mucosa and polyps alike
    for _ in range(rng.integers(3, 9)):
        centre = tuple(int(v) for v in rng.uniform(0.1, 0.9, 2) * size)
        axes = tuple(int(v) for v in rng.uniform(0.005, 0.02, 2) * size + 1)
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, (255, 250, 245), -1)
    img = cv2.GaussianBlur(img, (3, 3), 0) + rng.normal(0, 3, img.shape)
    vignette = np.clip(1.15 - np.hypot(*np.mgrid[-1:1:size * 1j, -1:1:size * 1j]) * 0.45, 0, 1)
    img = img * vignette[..., None]
    img[~fov] = 4
    mask &= fov
    return np.clip(img, 0, 255).astype(np.uint8), mask


def write_synth(out: str | Path, params: SynthParams) -> Path:
    """Write params.n_images frames in the canonical layout, atomically."""
    out = Path(out)
    with atomic_dir(out, "kdas data synth") as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for i in tqdm(range(params.n_images), desc="synth", unit="frame", disable=None):
            img, mask = synth_frame(params.seed, i, params.size, params.empty_fraction)
            Image.fromarray(img).save(tmp / "images" / f"synth_{i:04d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp / "masks" / f"synth_{i:04d}.png")
    return out
