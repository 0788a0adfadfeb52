"""One training engine for teacher and student: only the loss differs."""

from kdas.training.engine import TrainJob, TrainResult, train

__all__ = ["TrainJob", "TrainResult", "train"]
