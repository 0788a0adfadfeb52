"""Synthetic data and the torch Dataset with its transforms."""

from __future__ import annotations

import numpy as np
import torch

from conftest import make_dataset
from kdas.config import SplitParams, SynthParams
from kdas.data.dataset import PolypDataset
from kdas.data.manifest import build_manifest
from kdas.data.synth import synth_frame, write_synth
from kdas.io import read_mask, read_rgb


def test_synth_is_deterministic_with_exact_masks(tmp_path):
    params = SynthParams(n_images=12, size=96, empty_fraction=0.25, seed=3)
    a, b = write_synth(tmp_path / "a", params), write_synth(tmp_path / "b", params)
    for name in ("synth_0000.png", "synth_0007.png"):
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()
        assert set(np.unique(read_mask(a / "masks" / name))) <= {0, 255}
        assert read_rgb(a / "images" / name).shape == (96, 96, 3)
    fractions = [float((read_mask(p) > 127).mean()) for p in sorted((a / "masks").iterdir())]
    assert any(f == 0 for f in fractions) and any(f > 0.01 for f in fractions)
    other = synth_frame(4, 0, 96, 0.25)[0]
    assert not np.array_equal(other, read_rgb(a / "images" / "synth_0000.png"))


def test_synth_polyps_are_not_a_colour_threshold():
    """Inside and outside the mask the colours overlap: shape has to be learnt."""
    image, mask = synth_frame(0, 1, 160, 0.0)
    inside, outside = image[mask].mean(0), image[~mask & (image.sum(2) > 60)].mean(0)
    assert mask.any() and np.abs(inside - outside).max() < 60


def test_dataset_yields_unit_range_images_and_binary_masks(tmp_path):
    make_dataset(tmp_path / "raw" / "ds", n=4, img_ext=".jpg", mask_ext=".jpg")
    rows = build_manifest(tmp_path / "raw", ["ds"], SplitParams(0, 0, 0), near_duplicate_distance=4, workers=1)
    plain = PolypDataset(rows, size=64, augment=False)
    image, mask = plain[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and mask.shape == (1, 64, 64)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert 0 <= float(image.min()) < float(image.max()) <= 1  # RGB in [0, 1]: each model normalises itself
    augmented = PolypDataset(rows, size=64, augment=True)
    torch.manual_seed(0)
    np.random.seed(0)
    views = [augmented[0][1] for _ in range(8)]
    assert any(not torch.equal(v, mask) for v in views)  # flips / rotations really happen
    assert all(set(v.unique().tolist()) <= {0.0, 1.0} for v in views)
