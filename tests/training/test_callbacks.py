"""The trainer's extension points: callbacks around each epoch (the engine's own are
checkpoints, the log line, the caller's hook, early stopping and the reports) and the
optimizer a task builds (the official recipe's AdamW + StepLR unless it builds its own)."""

from __future__ import annotations

import pytest
import torch

from helpers import distill_params
from kdas.config import RoleModel, TrainParams
from kdas.training import TrainJob, train
from kdas.training.callbacks import Callback, EarlyStopping, default_callbacks
from kdas.training.engine import Trainer
from kdas.training.task import GroundTruthTask

TINY = TrainParams(image_size=64, batch_size=4, epochs=4, lr=1e-3, weight_decay=1e-4, grad_clip=0.5, multiscale=[1.0], lr_decay=0.1,
                   decay_epochs=50, patience=20, seed=0, workers=0, nproc_per_node=1, amp=True, compile=False, augment=False, weighted_bce=True)
MODEL = RoleModel(arch="polyp_pvt_tiny", backbone=None, weights="none", drop_path_rate=0.0)


def job(manifest, out, **kw) -> TrainJob:
    return TrainJob(role="student", model=MODEL, manifest=manifest, out_dir=out, train=TINY, distill=distill_params("none"), max_steps=1, **kw)


class Recorder(Callback):
    def __init__(self, stop_after: int):
        self.calls, self.stop_after = [], stop_after

    def on_train_start(self, trainer):
        self.calls.append("start")

    def on_epoch_end(self, trainer, epoch, metrics, improved):
        self.calls.append(epoch)
        trainer.stop = epoch + 1 >= self.stop_after

    def on_train_end(self, trainer):
        self.calls.append("end")


def test_callbacks_see_every_epoch_and_one_can_stop_the_training(manifest, tmp_path):
    recorder = Recorder(stop_after=2)
    result = train(job(manifest, tmp_path, callbacks=[recorder]))
    assert recorder.calls == ["start", 0, 1, "end"] and result.epochs_run == 2
    # only the engine's own callbacks write: without them no model file, checkpoint or report
    assert not [p.name for p in tmp_path.iterdir() if p.name in ("best.pt", "last.ckpt", "metrics.json", "history.csv")]


def test_the_default_callbacks_are_the_engines_own_in_order(manifest, tmp_path):
    names = [type(cb).__name__ for cb in default_callbacks(Trainer(job(manifest, tmp_path, on_epoch=lambda m, e: None)))]
    assert names == ["BestModel", "LastCheckpoint", "EpochLog", "EpochHook", "EarlyStopping", "Reports"]


def test_early_stopping_counts_the_epochs_since_the_best_again_on_resume(manifest, tmp_path):
    trainer = Trainer(job(manifest, tmp_path))
    trainer.history = [{"epoch": e} for e in (1, 2, 3, 4)]
    trainer.best_epoch = 1  # the best was epoch 2: epochs 3 and 4 were not better
    stopping = EarlyStopping(patience=3)
    stopping.on_train_start(trainer)
    assert stopping.bad_epochs == 2
    stopping.on_epoch_end(trainer, 4, {}, improved=False)
    assert trainer.stop


def test_a_task_builds_its_own_optimizer_and_schedule(manifest, tmp_path, monkeypatch):
    def sgd(self, parameters, train_params, device):
        optimizer = torch.optim.SGD(parameters, lr=0.5)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)

    default = Trainer(job(manifest, tmp_path / "default"))
    assert type(default.optimizer) is torch.optim.AdamW and type(default.scheduler) is torch.optim.lr_scheduler.StepLR
    monkeypatch.setattr(GroundTruthTask, "configure_optimizers", sgd)
    trainer = Trainer(job(manifest, tmp_path / "own"))
    assert type(trainer.optimizer) is torch.optim.SGD
    trainer.run()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5**4)  # its schedule stepped once per epoch
