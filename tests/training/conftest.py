"""Fixtures of the training tests and of each method's (tests/training/methods/)."""

from __future__ import annotations

import pytest
import torch

from helpers import disc_mask


@pytest.fixture
def maps():
    """(student logits, teacher logits, mask), B x 1 x 64 x 64: a confident teacher on a disc, a random student."""
    torch.manual_seed(0)
    mask = disc_mask()
    teacher = (mask * 2 - 1) * 6 + 0.5 * torch.randn_like(mask)
    return torch.randn_like(mask), teacher, mask
