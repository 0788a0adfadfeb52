"""Shared fixtures: real image files written by the tests, and paths to the shared data."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = SHARED / "datasets"

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
# DVC keeps site-wide state and config outside the repository: isolate the test session's
_DVC_HOME = Path(tempfile.mkdtemp(prefix="kdas-tests-dvc-"))
for var in ("DVC_SITE_CACHE_DIR", "DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR"):
    os.environ[var] = str(_DVC_HOME / var.lower())
os.environ["DVC_NO_ANALYTICS"] = "1"


def write_pair(images: Path, masks: Path, stem: str, *, size=(96, 80), img_ext=".png", mask_ext=".png", seed=0, fg=True, mode="RGB") -> tuple[Path, Path]:
    """A random image and a mask with an ellipse-ish square polyp, in the given formats."""
    rng = np.random.default_rng(seed)
    w, h = size
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    img_path = images / f"{stem}{img_ext}"
    img.save(img_path, **({"quality": 95} if img_ext == ".jpg" else {}))
    mask = np.zeros((h, w), np.uint8)
    if fg:
        mask[h // 4 : h // 2, w // 4 : w // 2] = 255
    mask_path = masks / f"{stem}{mask_ext}"
    Image.fromarray(mask).save(mask_path, **({"quality": 90} if mask_ext == ".jpg" else {}))
    return img_path, mask_path


def make_dataset(root: Path, n: int = 6, **kw) -> Path:
    """A plain images/ + masks/ dataset of n distinct pairs."""
    for i in range(n):
        write_pair(root / "images", root / "masks", f"img{i:02d}", seed=i, **kw)
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A project folder with params.yaml, as the cwd (kdas runs from the project root)."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tool_env() -> dict[str, str]:
    """Environment for subprocesses: this interpreter's scripts (kdas, dvc) first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env
