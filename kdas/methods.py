"""The distillation methods and KDAS's attention forms, named once. Torch-free: the params
schema (kdas/config.py) and the CLI's choices read these names; kdas.training.task builds
the task of each method."""

from __future__ import annotations

from typing import Literal, get_args

Method = Literal["none", "sgm", "kdas"]    # none: the ground truth alone
Attention = Literal["spatial", "pairwise"]  # KDAS's attention term (distill.attention)

METHODS: tuple[str, ...] = get_args(Method)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
