"""The optimizer and its schedule, built from params: the official recipe's AdamW with a step
decay (x train.lr_decay every train.decay_epochs) is the default; a task may build its own
(SegmentationTask.configure_optimizers)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kdas.config import TrainParams


def official_optimizer(parameters: Iterable[torch.nn.Parameter], train: TrainParams,
                       device: torch.device) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    # one multi-tensor kernel per step instead of a Python loop over ~300 parameters
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(parameters, lr=train.lr, weight_decay=train.weight_decay, **fast)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=train.decay_epochs, gamma=train.lr_decay)
