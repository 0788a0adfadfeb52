"""Fixtures of the training tests and of each method's (tests/training/methods/)."""

from __future__ import annotations

import pytest
import torch

from helpers import disc_mask


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """16 synthetic 64-px frames, split with a val part (the engine selects on it)."""
    from kdas.config import SplitParams, SynthParams
    from kdas.data.manifest import build_manifest
    from kdas.data.synth import write_synth

    root = tmp_path_factory.mktemp("synth")
    write_synth(root / "raw" / "synth", SynthParams(n_images=16, size=64, empty_fraction=0.0, seed=0))
    return build_manifest(root / "raw", ["synth"], SplitParams(val_fraction=0.25, test_fraction=0.2, seed=0), near_duplicate_distance=4, workers=1)


@pytest.fixture
def maps():
    """(student logits, teacher logits, mask), B x 1 x 64 x 64: a confident teacher on a disc, a random student."""
    torch.manual_seed(0)
    mask = disc_mask()
    teacher = (mask * 2 - 1) * 6 + 0.5 * torch.randn_like(mask)
    return torch.randn_like(mask), teacher, mask
