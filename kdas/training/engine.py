"""The training loop shared by teacher and student.

What makes it trustworthy:
- the model is selected on the held-out `val` split (meanDic of the standard protocol),
  never on a test set; early stopping watches the same number;
- the teacher is frozen: eval mode, no gradients, its forward under `inference_mode`;
- the student sees the same tensors whatever the method: the teacher gets its own view of
  the same augmented frame at its own size, and loading it draws nothing from the student's
  random streams, so a method at teacher weight 0 trains bit for bit as method none;
- every epoch ends with an atomic checkpoint of everything that moves (weights,
  optimiser, scheduler, scaler, RNG states, history), so a run killed at any moment
  resumes to the same result as an uninterrupted one (on CPU, same seed);
- gradients are clipped by value like the official code (`clip_gradient`), the
  learning-rate decay really fires, and flips/rotations really augment (train.augment);
- an epoch's order and augmentations follow from the seed and the epoch alone
  (`SeededSampler`), whatever the number of loader workers.

The loop trains and validates; what happens around each epoch (best model, checkpoint, log
line, early stop, reports) is kdas.training.callbacks, and the optimizer comes from the task
(SegmentationTask.configure_optimizers; kdas.training.optim: the official recipe's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.data import DataLoader

from kdas.checkpoint import ModelFile, load_model, save_torch
from kdas.config import DistillParams, ReferenceParams, RoleModel, TrainParams
from kdas.data.dataset import PolypDataset, SeededSampler
from kdas.device import autocast, autocast_dtype, select_device, tune_for_training
from kdas.evaluation.metrics import Evaluator, mean_dice
from kdas.io import file_sha256
from kdas.models import OUTPUT_STRIDE, create_model
from kdas.progress import Progress
from kdas.training.callbacks import Callback, default_callbacks
from kdas.training.distributed import barrier, broadcast, init_world, shutdown
from kdas.training.methods import create_task

log = logging.getLogger(__name__)

LAST = "last.ckpt"
BEST = "best.pt"
EpochCallback = Callable[[dict[str, float], int], None]


@dataclass
class TrainJob:
    role: str                      # teacher | student (names the outputs)
    model: RoleModel               # architecture, backbone, initial weights
    manifest: pd.DataFrame
    out_dir: Path
    train: TrainParams
    distill: DistillParams | None  # None (or method "none"): the ground truth alone
    teacher: Path | None = None    # model file of the frozen teacher (any method that distils)
    resume: bool = False
    device: str = "auto"
    max_steps: int | None = None   # per epoch; for smoke tests and benchmarks
    on_epoch: EpochCallback | None = None
    info: dict = field(default_factory=dict)  # plain values saved in the model file (run id, data id...)
    reference: ReferenceParams | None = None  # the training frames' profile the selected model file carries (None: none)
    callbacks: list[Callback] | None = None  # None: kdas.training.callbacks.default_callbacks

    @property
    def method(self) -> str:
        return self.distill.method if self.distill else "none"


@dataclass
class TrainResult:
    best_path: Path
    best_epoch: int
    best_val_dice: float
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)


def scaled_size(base: int, scale: float) -> int:
    """Multi-scale sizes are rounded to the model's stride (32)."""
    return max(OUTPUT_STRIDE, int(round(base * scale / OUTPUT_STRIDE)) * OUTPUT_STRIDE)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """RNG states as tensors and plain values only, so that the checkpoint loads with
    `weights_only=True` (a resume never unpickles code)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def _rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = manifest[(manifest["split"] == split) & (manifest["error"].fillna("") == "")]
    if rows.empty:
        raise ValueError(f"the manifest has no usable '{split}' images; check data.datasets and data.split in params.yaml")
    return rows


def _fingerprint(job: TrainJob, model_config: dict, ids: list[str]) -> str:
    """What a resumed run must share with the checkpoint: model, params, data and teacher
    (`--resume` of a checkpoint written with other settings starts afresh instead)."""
    teacher = file_sha256(job.teacher) if job.teacher and job.method != "none" else ""
    train = {k: v for k, v in dataclasses.asdict(job.train).items() if k not in ("workers", "nproc_per_node")}
    blob = json.dumps([model_config, dataclasses.asdict(job.model), train, job.distill and dataclasses.asdict(job.distill), teacher, ids], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def resized(batch: torch.Tensor, size: int) -> torch.Tensor:
    """`batch` at `size` x `size` (itself when it is that size already); antialiased when
    shrinking, as a resize of the frame itself would be."""
    if batch.shape[-1] == size:
        return batch
    return F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=True, antialias=size < batch.shape[-1])


def frames_to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A uint8 batch of frames to float on `device`, in [0, 1] and channels_last (what the
    convolutions run fastest on, CPU and GPU)."""
    return images.to(device, non_blocking=True).float().div_(255).contiguous(memory_format=torch.channels_last)


def to_device(images: torch.Tensor, masks: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batches from the loader to float on `device`: frames_to_device, masks {0, 1}."""
    return frames_to_device(images, device), masks.to(device, non_blocking=True).float()


def _val_maps(model: torch.nn.Module, data: PolypDataset, device: torch.device, batch_size: int, amp: bool, desc: str):
    """(id, probability map, boolean mask) of each val image, at the training size."""
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    progress = Progress(loader, desc)
    start = 0
    with torch.inference_mode():
        for images, masks in progress:
            images, masks = to_device(images, masks, device)
            with autocast(device, amp):
                p1, p2 = model(images)
            probs = torch.sigmoid((p1 + p2).float()).cpu().double().numpy()[:, 0]
            for k, (prob, mask) in enumerate(zip(probs, masks.cpu().numpy()[:, 0] > 0.5)):
                yield data.ids[start + k], prob, mask
            start += len(probs)
            progress.step(len(probs))
    progress.close()


def val_dice(model: torch.nn.Module, data: PolypDataset, device: torch.device, batch_size: int, amp: bool, desc: str = "val") -> float:
    """val meanDic of the standard protocol, the one figure model selection needs each epoch."""
    return float(np.mean([mean_dice(prob, mask) for _, prob, mask in _val_maps(model, data, device, batch_size, amp, desc)]))


def val_report(model: torch.nn.Module, data: PolypDataset, device: torch.device, batch_size: int, amp: bool) -> dict[str, float]:
    """Every figure of the protocol on val, once, for the selected model."""
    evaluator = Evaluator()
    for name, prob, mask in _val_maps(model, data, device, batch_size, amp, "val (full protocol)"):
        evaluator.add(name, prob, mask)
    return evaluator.summary()


class Trainer:
    def __init__(self, job: TrainJob):
        self.job = job
        p = job.train
        self.device = select_device(job.device)
        self.world = init_world(self.device)
        if self.device.type == "cuda" and self.world.distributed:
            self.device = torch.device("cuda", self.world.local_rank)
            torch.cuda.set_device(self.device)
        seed_everything(p.seed)
        tune_for_training(self.device)
        self.out_dir = Path(job.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

        # models first: missing weights or a bad teacher file stop the run before any decoding
        spec = job.model
        self.model = create_model(spec.arch, backbone=spec.backbone, pretrained=spec.weights, drop_path_rate=spec.drop_path_rate)
        self.model.to(self.device, memory_format=torch.channels_last)

        def load_teacher() -> ModelFile:
            # building a model draws its initial weights: off the global stream, so that the
            # student's drop path and dropout draw the same with a teacher as without one
            with torch.random.fork_rng(devices=[]):
                teacher = load_model(job.teacher, self.device)
            teacher.model.to(memory_format=torch.channels_last)
            return teacher

        # the method's task, decided once; only a method that distils loads the teacher
        self.task = create_task(job.distill, load_teacher if job.teacher is not None else None, weighted_bce=p.weighted_bce,
                                precision=lambda: autocast(self.device, p.amp), compile=p.compile)
        self.train_rows = _rows(job.manifest, "train")
        self.train_data = PolypDataset(self.train_rows, p.image_size, augment=p.augment, workers=max(1, p.workers),
                                       teacher_size=self.task.teacher_size)
        self.val_data = PolypDataset(_rows(job.manifest, "val"), p.image_size, augment=False, workers=max(1, p.workers))
        self.sampler = SeededSampler(self.train_data, p.seed, num_replicas=self.world.size, rank=self.world.rank)
        # persistent workers: forked once, not every epoch (each fork costs seconds with the cache).
        # The loader draws its workers' base seed on each new iterator, which persistent workers
        # skip: a generator of its own keeps those draws off the global RNG (drop path, dropout).
        self.loader = DataLoader(
            self.train_data, batch_size=p.batch_size, sampler=self.sampler, num_workers=p.workers,
            pin_memory=self.device.type == "cuda", drop_last=len(self.train_data) >= p.batch_size * self.world.size,
            persistent_workers=p.workers > 0, generator=torch.Generator().manual_seed(p.seed),
        )

        self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None) if self.world.distributed else self.model
        if p.compile:
            self.net = torch.compile(self.net)
        self.optimizer, self.scheduler = self.task.configure_optimizers(self.model.parameters(), p, self.device)
        # fp16 needs loss scaling; bf16 and full precision do not
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=p.amp and autocast_dtype(self.device) == torch.float16)
        self.start_epoch, self.best, self.best_epoch, self.history = 0, -math.inf, -1, []
        self.best_path, self.stop = self.out_dir / BEST, False  # a callback sets stop to end the training
        self.callbacks = default_callbacks(self) if job.callbacks is None else job.callbacks
        self.fingerprint = _fingerprint(job, self.model.config(), self.train_data.ids + self.val_data.ids)

    def val_report(self, model: torch.nn.Module) -> dict[str, float]:
        """Every figure of the protocol on val for `model` (the selected one)."""
        return val_report(model, self.val_data, self.device, self.job.train.batch_size, self.job.train.amp)

    # -- checkpoints -----------------------------------------------------------------
    def save_last(self, epoch: int) -> None:
        state = {
            "epoch": epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "best": self.best,
            "best_epoch": self.best_epoch, "history": self.history, "rng": _rng_state(),
            "model_config": self.model.config(), "fingerprint": self.fingerprint,
        }
        save_torch(state, self.out_dir / LAST)

    def load_last(self) -> None:
        path = self.out_dir / LAST
        if not path.exists():
            log.info("--resume: no %s yet, starting from scratch", path)
            return
        try:  # tensors and plain values only: a crafted file cannot run code here
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a kdas training checkpoint ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); "
                             "delete it to start afresh") from exc
        if not isinstance(state, dict) or "model_config" not in state:
            raise ValueError(f"{path}: not a kdas training checkpoint; delete it to start afresh")
        if state.get("fingerprint") != self.fingerprint:
            log.warning("--resume: %s was written with other settings (model, params, data or teacher); starting afresh", path)
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.best, self.best_epoch, self.history = state["best"], state["best_epoch"], state["history"]
        self.start_epoch = state["epoch"] + 1
        _set_rng_state(state["rng"])
        log.info("resumed %s after epoch %d (best val meanDic %.4f at epoch %d)", path, state["epoch"] + 1, self.best, self.best_epoch + 1)

    # -- the loop --------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the train split. Nothing waits for the device inside it: the loss
        sums stay on the device and are read when progress is shown and at the end. The
        phases are named for torch.profiler (benchmarks/bench_training.py)."""
        p = self.job.train
        self.net.train()
        self.sampler.set_epoch(epoch)
        scales = len(p.multiscale)
        sums: dict[str, torch.Tensor] = {}
        n_images, data_time = 0, 0.0
        total = len(self.loader) if self.job.max_steps is None else min(len(self.loader), self.job.max_steps)
        bar = Progress(self.loader, f"{self.job.role} epoch {epoch + 1}/{p.epochs}", total=total, enabled=self.world.is_main)

        def running() -> dict[str, float]:
            return {k: float(v) / max(1, n_images * scales) for k, v in sums.items()}

        started = time.perf_counter()
        batches = iter(bar)
        for _ in range(total):
            tick = time.perf_counter()
            with record_function("data"):
                images, masks, *view = next(batches)
            data_time += time.perf_counter() - tick
            with record_function("copy"):
                images, masks = to_device(images, masks, self.device)
                view = [frames_to_device(v, self.device) for v in view]
            for scale in p.multiscale:
                # at scale 1 the student trains on the loader's tensors as they are (resized from
                # the original frame as evaluation resizes the test frames); other scales resize
                # frames and masks bilinearly, as the official multi-scale training does
                x, y = resized(images, scaled_size(p.image_size, scale)), resized(masks, scaled_size(p.image_size, scale))
                teacher_x = resized(view[0], scaled_size(self.task.teacher_size, scale)) if view else None
                losses = self.task(self.net, x, y, teacher_x)
                with record_function("backward"):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(losses["loss"]).backward()
                with record_function("step"):
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_value_(self.model.parameters(), p.grad_clip, foreach=True)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach() * len(images)
            n_images += len(images)
            bar.step(len(images) * self.world.size, running)
        bar.close()
        seconds = time.perf_counter() - started
        images = n_images * self.world.size
        return {
            **{f"train_{k}": v for k, v in running().items()},
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": images / seconds if seconds else 0.0,
            "passes_per_s": images * scales / seconds if seconds else 0.0,  # an image at 3 scales is 3 passes
            "data_wait_share": data_time / seconds if seconds else 0.0,
        }

    def run(self) -> TrainResult:
        p = self.job.train
        if self.job.resume:
            self.load_last()
        callbacks = [cb for cb in self.callbacks if self.world.is_main or not cb.main_only]
        for cb in callbacks:
            cb.on_train_start(self)
        for epoch in range(self.start_epoch, p.epochs):
            started = time.perf_counter()
            metrics = self.train_epoch(epoch)
            self.scheduler.step()
            if self.world.is_main:
                metrics["val_meanDic"] = val_dice(self.model, self.val_data, self.device, p.batch_size, p.amp,
                                                  f"{self.job.role} val {epoch + 1}/{p.epochs}")
                metrics["epoch_seconds"] = time.perf_counter() - started
            metrics = broadcast(self.world, metrics)
            improved = metrics["val_meanDic"] > self.best
            if improved:
                self.best, self.best_epoch = metrics["val_meanDic"], epoch
            self.history.append({"epoch": epoch + 1, **metrics})
            for cb in callbacks:
                cb.on_epoch_end(self, epoch, metrics, improved)
            barrier(self.world)
            if self.stop:
                break
        for cb in callbacks:
            cb.on_train_end(self)
        barrier(self.world)
        shutdown(self.world)
        return TrainResult(self.best_path, self.best_epoch + 1, self.best, len(self.history), self.history)


def train(job: TrainJob) -> TrainResult:
    return Trainer(job).run()
