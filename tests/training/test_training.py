"""The training engine: learning, resume after SIGKILL, frozen teacher, distillation methods;
faults around `kdas train`: SIGTERM ends its MLflow run KILLED (not RUNNING forever), and its
folder's lock stops a second training (or one beside an orphan of a killed `dvc repro`)."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import distill_params, tiny_teacher_project, tool_environ
from kdas.checkpoint import load_model, save_model
from kdas.config import RoleModel, TrainParams
from kdas.data.dataset import PolypDataset
from kdas.io import folder_lock
from kdas.models import create_model
from kdas.training import TrainJob, train
from kdas.training.engine import scaled_size, to_device
from kdas.training.methods import names
from kdas.training.task import DistillationTask, GroundTruthTask

TINY = TrainParams(image_size=64, batch_size=4, epochs=3, lr=1e-3, weight_decay=1e-4, grad_clip=0.5,
                   multiscale=[1.0], lr_decay=0.1, decay_epochs=50, patience=20, seed=0, workers=0, nproc_per_node=1, amp=True, compile=False,
                   augment=True, weighted_bce=True)
NONE = distill_params("none")
DISTILLING = [name for name in names() if name != "none"]
TINY_MODEL = RoleModel(arch="polyp_pvt_tiny", backbone=None, weights="none", drop_path_rate=0.0)


def job(manifest, out, **kw):
    return TrainJob(**{"role": "student", "model": TINY_MODEL, "manifest": manifest, "out_dir": out, "train": TINY, "distill": NONE, **kw})


def test_multiscale_sizes_round_to_the_stride():
    assert [scaled_size(352, s) for s in (0.75, 1.0, 1.25)] == [256, 352, 448]
    assert scaled_size(64, 0.25) == 32


@pytest.mark.slow
def test_a_student_overfits_four_synthetic_images(manifest):
    torch.manual_seed(0)
    rows = manifest[manifest["foreground_fraction"] > 0.02].head(4)
    data = PolypDataset(rows, size=64, augment=False, workers=1)
    images, masks = to_device(torch.stack([data[i][0] for i in range(4)]), torch.stack([data[i][1] for i in range(4)]), torch.device("cpu"))
    model = create_model("polyp_pvt_b0")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    task = GroundTruthTask(weighted_bce=True)
    for _ in range(120):
        loss = task(model, images, masks)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        p1, p2 = model(images)
    pred = torch.sigmoid(p1 + p2) > 0.5
    dice = (2 * (pred & (masks > 0.5)).sum((1, 2, 3)) / (pred.sum((1, 2, 3)) + (masks > 0.5).sum((1, 2, 3)))).mean()
    assert dice > 0.9, f"Dice {dice:.3f} after 120 steps"


def test_training_writes_best_model_history_and_metrics(manifest, tmp_path):
    seen = []
    result = train(job(manifest, tmp_path, on_epoch=lambda m, e: seen.append(e)))
    assert seen == [1, 2, 3] and result.epochs_run == 3
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.ckpt").exists()
    assert (tmp_path / "history.csv").read_text().splitlines()[0].startswith("epoch,train_loss,train_structure")
    best = max(result.history, key=lambda h: h["val_meanDic"])
    assert result.best_val_dice == best["val_meanDic"] and result.best_epoch == best["epoch"]
    assert load_model(tmp_path / "best.pt").info["epoch"] == result.best_epoch
    assert all(0 <= h["data_wait_share"] <= 1 and h["images_per_s"] > 0 for h in result.history)


def test_learning_rate_decay_fires(manifest, tmp_path):
    result = train(job(manifest, tmp_path, train=dataclasses.replace(TINY, decay_epochs=1, epochs=2)))
    assert [h["lr"] for h in result.history] == pytest.approx([1e-3, 1e-4])


def test_early_stopping_and_selection_follow_the_val_score(manifest, tmp_path, monkeypatch):
    scores = iter([0.5, 0.6, 0.55, 0.58, 0.9])
    monkeypatch.setattr("kdas.training.engine.val_dice", lambda *a: next(scores))
    result = train(job(manifest, tmp_path, train=dataclasses.replace(TINY, epochs=5, patience=2)))
    assert result.epochs_run == 4 and result.best_epoch == 2 and result.best_val_dice == 0.6
    assert load_model(tmp_path / "best.pt").info["epoch"] == 2


@pytest.mark.parametrize("method", DISTILLING)
def test_distillation_keeps_the_teacher_frozen(manifest, tmp_path, method):
    teacher_file = save_model(tmp_path / "teacher.pt", create_model("polyp_pvt_tiny"), image_size=64)
    before = torch.load(teacher_file, weights_only=True)["state_dict"]
    result = train(job(manifest, tmp_path / "out", distill=distill_params(method), teacher=teacher_file, train=dataclasses.replace(TINY, epochs=1)))
    terms = {k: v for k, v in result.history[0].items() if k.startswith("train_") and k not in ("train_loss", "train_structure")}
    assert terms and all(v > 0 for v in terms.values())  # the method's own components, each logged
    after = torch.load(teacher_file, weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_larger_teacher_sees_the_frames_at_its_size(manifest, tmp_path):
    """A teacher saved at 96 px distils into a 64-px student: it gets 96-px batches, the
    student 64-px ones, and the loss compares maps at the student's size."""
    teacher_file = save_model(tmp_path / "teacher.pt", create_model("polyp_pvt_tiny"), image_size=96)
    seen: dict[str, set[int]] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DistillationTask, "_teacher_maps", _spying(seen))
        result = train(job(manifest, tmp_path / "out", distill=distill_params("kdas"), teacher=teacher_file,
                           train=dataclasses.replace(TINY, epochs=1, multiscale=[0.5, 1.0])))
    assert seen["teacher"] == {64, 96} and seen["student"] == {32, 64}  # each model at its size, per scale
    assert math.isfinite(result.history[0]["train_attention"]) and result.history[0]["train_attention"] > 0
    assert load_model(tmp_path / "out" / "best.pt").image_size == 64


@pytest.mark.parametrize("method", DISTILLING)
def test_at_teacher_weight_zero_every_method_trains_bit_for_bit_as_the_student_alone(manifest, tmp_path, method):
    """The control is a control: a method whose teacher terms weigh 0, distilling from a teacher
    larger than the student (96 px against 64), trains exactly as method none with the same
    seed (augmentation, drop path, every epoch's loss and val meanDic, the selected weights):
    the student's input pipeline and random streams do not depend on the method."""
    teacher_file = save_model(tmp_path / "teacher.pt", create_model("polyp_pvt_tiny"), image_size=96)
    model = dataclasses.replace(TINY_MODEL, drop_path_rate=0.2)
    runs = {}
    for name, distill in (("none", NONE), (method, distill_params(method, weight=0.0))):
        runs[name] = train(job(manifest, tmp_path / name, model=model, distill=distill, teacher=teacher_file, train=dataclasses.replace(TINY, epochs=2)))
    alone, distilled = runs["none"], runs[method]
    for a, b in zip(alone.history, distilled.history, strict=True):
        assert (a["val_meanDic"], a["train_structure"], a["train_loss"]) == (b["val_meanDic"], b["train_structure"], b["train_loss"])
    weights = [torch.load(r.best_path, weights_only=True)["state_dict"] for r in (alone, distilled)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _spying(seen: dict):
    """DistillationTask._teacher_maps, recording the teacher's input size and the student's map size."""
    real = DistillationTask._teacher_maps

    def spy(self, images, size):
        seen.setdefault("teacher", set()).add(images.shape[-1])
        seen.setdefault("student", set()).add(size[-1])
        return real(self, images, size)
    return spy


def test_a_method_without_a_teacher_never_loads_one(manifest, tmp_path):
    """Method none ignores a teacher file the job names (here a missing one): its task never
    loads it, and the frames load at the student's size."""
    result = train(job(manifest, tmp_path, teacher=tmp_path / "missing.pt", train=dataclasses.replace(TINY, epochs=1), max_steps=1))
    assert result.epochs_run == 1 and {k for k in result.history[0] if k.startswith("train_")} == {"train_loss", "train_structure"}


def test_distillation_without_a_teacher_is_refused(manifest, tmp_path):
    with pytest.raises(ValueError, match="needs a teacher"):
        train(job(manifest, tmp_path, distill=distill_params("kdas")))


RUN_SCRIPT = """
import sys, pandas as pd
from pathlib import Path
from kdas.config import TrainParams, DistillParams, RoleModel
from kdas.training import TrainJob, train
train(TrainJob(role="student", model=RoleModel("polyp_pvt_tiny", None, "none", 0.0), manifest=pd.read_parquet(sys.argv[1]), out_dir=Path(sys.argv[2]),
      train=TrainParams(**eval(sys.argv[3])), distill=DistillParams(method="none", seed=0), resume="--resume" in sys.argv))
"""


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(manifest, tmp_path):
    params = dataclasses.replace(TINY, epochs=8, workers=1)
    manifest_file = tmp_path / "manifest.parquet"
    manifest.to_parquet(manifest_file)
    args = [sys.executable, "-c", RUN_SCRIPT, str(manifest_file)]

    subprocess.run([*args, str(tmp_path / "straight"), repr(dataclasses.asdict(params))], check=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, str(killed), repr(dataclasses.asdict(params))])
    deadline = time.time() + 120
    while not (killed / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = torch.load(killed / "last.ckpt", weights_only=True)["epoch"] + 1
    assert done < params.epochs, "the run finished before it could be killed"
    assert not (killed / "history.csv").exists()

    subprocess.run([*args, str(killed), repr(dataclasses.asdict(params)), "--resume"], check=True)
    a = torch.load(tmp_path / "straight" / "best.pt", weights_only=True)
    b = torch.load(killed / "best.pt", weights_only=True)
    assert a["info"] == b["info"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert (tmp_path / "straight" / "history.csv").read_text().count("\n") == (killed / "history.csv").read_text().count("\n")


class _Exploit:
    """Unpickling this runs a shell command (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_resume_checkpoint_never_runs_code(manifest, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model_config": {}, "method": "none", "payload": _Exploit(marker)}, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="not a kdas training checkpoint"):
        train(job(manifest, tmp_path, resume=True))
    assert not marker.exists()


@pytest.mark.slow
def test_two_process_gloo_run_trains_and_writes_one_checkpoint(manifest, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    manifest_file = tmp_path / "manifest.parquet"
    manifest.to_parquet(manifest_file)
    params = dataclasses.replace(TINY, epochs=2, batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(manifest_file), str(tmp_path / "ddp"), repr(dataclasses.asdict(params))],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert files == ["best.pt", "history.csv", "history.png", "last.ckpt", "losses.csv", "metrics.json"]
    assert "train_loss" in (tmp_path / "ddp" / "history.csv").read_text()
    assert load_model(tmp_path / "ddp" / "best.pt").config["backbone"] == "test_convnext"


@pytest.mark.slow
def test_the_same_seed_on_the_same_machine_gives_identical_metrics(manifest, tmp_path):
    """Reproducibility: two runs of one training job (same seed, same machine and threads)
    give the same numbers to the bit, and the same weights."""
    p = dataclasses.replace(TINY, epochs=2)
    first, second = (train(job(manifest, tmp_path / name, train=p, max_steps=2)) for name in ("a", "b"))
    keys = ("train_loss", "train_structure", "val_meanDic")
    assert [{k: h[k] for k in keys} for h in first.history] == [{k: h[k] for k in keys} for h in second.history]
    a, b = load_model(first.best_path).model.state_dict(), load_model(second.best_path).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_multiscale_trains_each_batch_at_each_scale(manifest, tmp_path, monkeypatch):
    sizes, call = [], GroundTruthTask.__call__
    monkeypatch.setattr(GroundTruthTask, "__call__",
                        lambda self, net, x, y, *rest: sizes.append((tuple(x.shape[-2:]), tuple(y.shape[-2:]))) or call(self, net, x, y, *rest))
    p = dataclasses.replace(TINY, epochs=1, multiscale=[0.5, 1.0, 1.5])
    result = train(job(manifest, tmp_path, train=p, max_steps=2))
    assert sizes == [((32, 32),) * 2, ((64, 64),) * 2, ((96, 96),) * 2] * 2  # 2 batches x 3 scales, masks resized too
    assert result.history[0]["train_loss"] > 0


@pytest.mark.slow
def test_the_loader_workers_do_not_change_the_result(manifest, tmp_path):
    """Augmentations are seeded per sample (seed, epoch, index), not per worker: no workers
    and two persistent workers train the same weights."""
    p = dataclasses.replace(TINY, epochs=2)
    runs = [train(job(manifest, tmp_path / str(w), train=dataclasses.replace(p, workers=w), max_steps=2)) for w in (0, 2)]
    a, b = (load_model(r.best_path).model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_train_compile_runs_the_compiled_model_and_loss(manifest, tmp_path):
    result = train(job(manifest, tmp_path, train=dataclasses.replace(TINY, epochs=1, compile=True), max_steps=1))
    assert result.epochs_run == 1 and result.history[0]["train_loss"] > 0


# --------------------------------------------------------------------------- faults around `kdas train`


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_ends_the_run_killed_and_a_second_training_into_the_folder_is_refused(workdir, mlflow_store):
    from mlflow.tracking import MlflowClient

    tiny_teacher_project(workdir, epochs=200, patience=500)
    first = subprocess.Popen([sys.executable, "-m", "kdas", "train", "teacher"], cwd=workdir, env=tool_environ(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (workdir / "models" / "teacher" / "last.ckpt").exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "kdas", "train", "teacher"], cwd=workdir, env=tool_environ(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert second.stderr.strip() == (f"error: models/teacher: pid {first.pid} (kdas train teacher) is writing into it; wait for it "
                                         "to end or stop it, or write elsewhere (--out)")
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 128 + signal.SIGTERM
    finally:
        if first.poll() is None:
            first.kill()
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("train_teacher", "KILLED")]  # the refused one made no run
    with folder_lock(workdir / "models" / "teacher", "the next training"):
        pass
    assert (workdir / "models" / "teacher" / "last.ckpt").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_training_whose_dvc_repro_is_killed_stops_instead_of_running_on_as_an_orphan(workdir, mlflow_store):
    import psutil
    from mlflow.tracking import MlflowClient

    tiny_teacher_project(workdir, epochs=200, patience=500)
    (workdir / "dvc.yaml").write_text("stages:\n  train_teacher:\n    cmd: kdas train teacher\n    outs:\n      - models/teacher/best.pt\n")
    subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=workdir, check=True, env=tool_environ())
    dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train_teacher"], cwd=workdir, env=tool_environ(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (workdir / "models" / "teacher" / "last.ckpt").exists():
            assert dvc.poll() is None, "dvc repro ended before training"
            time.sleep(0.05)
        [training] = [p for p in psutil.Process(dvc.pid).children(recursive=True) if "train" in p.cmdline()]
        dvc.kill()  # SIGKILL: dvc runs no cleanup, and nothing forwards it to the stage
        dvc.wait(30)
        training.wait(30)  # stopped by its own watch (psutil cannot see a grandchild's status: its run below can)
    finally:
        for proc in psutil.Process().children(recursive=True):
            if "train" in proc.cmdline():
                proc.kill()
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("train_teacher", "KILLED")]
    with folder_lock(workdir / "models" / "teacher", "the next training"):
        pass
