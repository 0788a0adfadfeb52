"""Synthetic data and the torch Dataset with its transforms."""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch

from helpers import make_dataset
from kdas.config import SplitParams, SynthParams
from kdas.data.dataset import PolypDataset, SeededSampler
from kdas.data.manifest import build_manifest
from kdas.data.synth import synth_frame, write_synth
from kdas.data.transforms import seed_augment
from kdas.io import read_mask, read_rgb
from kdas.training.engine import to_device


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


def test_dataset_yields_byte_images_and_binary_masks(tmp_path):
    make_dataset(tmp_path / "raw" / "ds", n=4, img_ext=".jpg", mask_ext=".jpg")
    rows = build_manifest(tmp_path / "raw", ["ds"], SplitParams(0, 0, 0), near_duplicate_distance=4, workers=1)
    plain = PolypDataset(rows, size=64, augment=False)
    image, mask = plain[0]
    # bytes cross the loader's process boundary; the training loop scales them on its device
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8 and mask.shape == (1, 64, 64) and mask.dtype == torch.uint8
    assert set(mask.unique().tolist()) == {0, 1}
    x, y = to_device(image[None], mask[None], torch.device("cpu"))
    assert 0 <= float(x.min()) < float(x.max()) <= 1 and x.is_contiguous(memory_format=torch.channels_last)  # each model normalises itself
    assert y.dtype == torch.float32 and torch.equal(y[0], mask.float())

    augmented = PolypDataset(rows, size=64, augment=True)
    views = [augmented[(0, seed)][1] for seed in range(8)]
    assert any(not torch.equal(v, mask) for v in views)  # flips / rotations really happen
    assert all(set(v.unique().tolist()) <= {0, 1} for v in views)
    assert all(torch.equal(augmented[(0, 3)][0], augmented[(0, 3)][0]) for _ in range(2))  # a sample's seed fixes its augmentation


def test_each_transform_draws_from_its_own_stream():
    """albumentations' set_random_seed gives every transform the same seed: both flips then
    always fire together. seed_augment must not."""
    image = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    flips = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    seen = set()
    for seed in range(32):
        seed_augment(flips, seed)
        out = flips(image=image)["image"]
        seen.add((bool(np.array_equal(out, image[:, ::-1]) or np.array_equal(out, image[::-1, ::-1])),
                  bool(np.array_equal(out, image[::-1]) or np.array_equal(out, image[::-1, ::-1]))))
    assert seen == {(False, False), (True, False), (False, True), (True, True)}


def test_seeded_sampler_order_and_seeds_depend_on_seed_and_epoch_alone():
    data = list(range(6))
    first = list(SeededSampler(data, seed=0))
    assert sorted(i for i, _ in first) == data and len({s for _, s in first}) == 6
    sampler = SeededSampler(data, seed=0)
    next(iter(sampler))  # an epoch cut short leaves nothing behind
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and list(SeededSampler(data, seed=1)) != first
    halves = [list(SeededSampler(data, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(i for half in halves for i, _ in half) == data  # ranks split an epoch
