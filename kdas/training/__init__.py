"""One training engine for teacher and student: only the task differs (kdas.training.task,
one per distillation method)."""

from kdas.training.engine import TrainJob, TrainResult, train
from kdas.training.task import create_task

__all__ = ["TrainJob", "TrainResult", "create_task", "train"]
