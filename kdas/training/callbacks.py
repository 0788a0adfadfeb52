"""What the engine does around each epoch, as callbacks (Lightning's shape): the engine
trains and validates; checkpoints, the log line, the caller's hook, early stopping and the
reports are these. They run in the order given, after each epoch's validation, on every
process; a callback that writes (`main_only`) runs on the main process alone under DDP. One
that ends the training sets `trainer.stop` and runs on every process, so that all stop together.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch

from kdas.checkpoint import load_model, save_model
from kdas.io import atomic_path, write_text
from kdas.progress import clock
from kdas.training.curves import plot_history


class Trainer(Protocol):
    """What a callback sees of the engine's Trainer (kdas.training.engine)."""

    job: Any  # its TrainJob
    model: torch.nn.Module
    task: Any  # its SegmentationTask
    device: torch.device
    out_dir: Path
    best_path: Path
    train_rows: pd.DataFrame
    history: list[dict[str, float]]
    best: float
    best_epoch: int  # 0-based; -1 before the first
    stop: bool  # set to end the training after this epoch

    def save_last(self, epoch: int) -> None: ...

    def val_report(self, model: torch.nn.Module) -> dict[str, float]: ...

log = logging.getLogger("kdas.training.engine")


class Callback:
    main_only = False  # True: runs on the main process alone (it writes files or logs)

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first epoch (after a resume has restored the history)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float], improved: bool) -> None:
        """After epoch `epoch` (0-based) and its validation; `improved`: a new best val meanDic."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last epoch (or the early stop)."""


class BestModel(Callback):
    """best.pt: the model of the best val meanDic so far, with where it came from."""

    main_only = True

    def on_epoch_end(self, trainer, epoch, metrics, improved):
        if improved:
            job = trainer.job
            save_model(trainer.best_path, trainer.model, image_size=job.train.image_size,
                       info={"role": job.role, "epoch": epoch + 1, "val_meanDic": trainer.best, "method": job.method, **job.info})


class LastCheckpoint(Callback):
    """last.ckpt: everything that moves, each epoch, so that `--resume` continues bit for bit."""

    main_only = True

    def on_epoch_end(self, trainer, epoch, metrics, improved):
        trainer.save_last(epoch)


class EpochLog(Callback):
    """The line per epoch: loss, val meanDic, speed, time left."""

    main_only = True

    def on_epoch_end(self, trainer, epoch, metrics, improved):
        epochs = trainer.job.train.epochs
        left = (epochs - epoch - 1) * metrics["epoch_seconds"]
        log.info("%s epoch %d/%d: loss %.4f, val meanDic %.4f%s, %.1f images/s, %.0f s%s", trainer.job.role, epoch + 1, epochs,
                 metrics["train_loss"], metrics["val_meanDic"], " (best)" if improved else "", metrics["images_per_s"],
                 metrics["epoch_seconds"], f", at most {clock(left)} to go" if left else "")


class EpochHook(Callback):
    """The caller's own function of (metrics, epoch number): MLflow's per-epoch metrics, say."""

    main_only = True

    def __init__(self, hook: Callable[[dict[str, float], int], None]):
        self.hook = hook

    def on_epoch_end(self, trainer, epoch, metrics, improved):
        self.hook(metrics, epoch + 1)


class EarlyStopping(Callback):
    """Stops after `patience` epochs without a better val meanDic (counted again on resume)."""

    def __init__(self, patience: int):
        self.patience, self.bad_epochs = patience, 0

    def on_train_start(self, trainer):
        self.bad_epochs = sum(1 for h in trainer.history if h["epoch"] > trainer.best_epoch + 1)

    def on_epoch_end(self, trainer, epoch, metrics, improved):
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        if self.bad_epochs >= self.patience:
            log.info("early stop: no better val meanDic for %d epochs", self.bad_epochs)
            trainer.stop = True


class Reports(Callback):
    """history.csv (DVC plots), history.png (its picture), losses.csv and metrics.json (DVC
    metrics) beside the model; the selected model scored on val by the full protocol, and the
    profile of its training frames written into it (kdas.monitoring). losses.csv holds the
    method's loss components per epoch in long form (epoch, component, value): dvc.yaml's plot
    of them colours by component (kdas/training/loss_components.json)."""

    main_only = True

    def on_train_end(self, trainer):
        out, history = trainer.out_dir, trainer.history
        with atomic_path(out / "history.csv") as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)
        components = ["loss", *trainer.task.components]
        with atomic_path(out / "losses.csv") as tmp:
            pd.DataFrame([{"epoch": h["epoch"], "component": c, "value": h[f"train_{c}"]} for h in history for c in components],
                         columns=["epoch", "component", "value"]).to_csv(tmp, index=False)
        if history:
            plot_history(history, out / "history.png")
        summary = {"best_epoch": trainer.best_epoch + 1, "best_val_meanDic": trainer.best, "epochs_run": len(history),
                   "train_seconds": sum(h.get("epoch_seconds", 0.0) for h in history)}
        if trainer.best_path.exists():  # the selected model on val, every figure of the protocol (per epoch only meanDic)
            job = trainer.job
            summary["val"] = trainer.val_report(load_model(trainer.best_path, trainer.device).model)
            if job.reference is not None and job.reference.frames:
                from kdas.monitoring.profile import attach_reference

                frames = [Path(f) for f in trainer.train_rows["image_path"]]
                reference = attach_reference(trainer.best_path, frames, job.reference, trainer.device)
                log.info("%s: the reference profile of %s", trainer.best_path, reference.source)
        write_text(out / "metrics.json", json.dumps(summary, indent=2))


def default_callbacks(trainer: Trainer) -> list[Callback]:
    """The engine's own, in order: best model, last checkpoint, log line, the caller's hook,
    early stopping, reports."""
    job = trainer.job
    return [BestModel(), LastCheckpoint(), EpochLog(), *([EpochHook(job.on_epoch)] if job.on_epoch else []),
            EarlyStopping(job.train.patience), Reports()]
