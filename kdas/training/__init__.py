"""One training engine for teacher and student: only the task differs (kdas.training.task;
one module per distillation method in kdas.training.methods).

The engine (and torch) loads on first use of its names: `kdas train --help` and the methods'
names (kdas.training.methods) need neither."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdas.training.engine import TrainJob, TrainResult, train

__all__ = ["TrainJob", "TrainResult", "train"]


def __getattr__(name: str):
    if name in __all__:
        from kdas.training import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
