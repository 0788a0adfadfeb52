"""Method none: the student (or the teacher) alone on the ground truth, ``loss = S``."""

from __future__ import annotations

from pydantic.dataclasses import dataclass

from kdas.config import SCHEMA
from kdas.training.task import GroundTruthTask as Task

__all__ = ["Params", "Task"]


@dataclass(frozen=True, config=SCHEMA)
class Params:
    """No settings (no `distill.none` section needed)."""
