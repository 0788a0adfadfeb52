"""`kdas train teacher|student`: the train_teacher and distill stages of dvc.yaml. One
training job per run, tracked in MLflow (rank 0 alone under torchrun), stopped with the
dvc that started it."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path

import click

from kdas.cli import MANIFEST, params_of
from kdas.config import DistillParams
from kdas.training import methods


@click.group()
def train() -> None:
    """Train the teacher, or distil it into the student."""


def _train_options(f):
    for option in reversed([
        click.option("--manifest", default=MANIFEST, show_default=True, type=click.Path(path_type=Path)),
        click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: models/<role>)."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint (if written with the same settings; else start afresh)."),
        click.option("--device", default="auto", show_default=True, help="auto (cuda, mps, cpu) or a torch device."),
        click.option("--max-steps", type=int, help="Stop each epoch after this many batches (smoke tests)."),
    ]):
        f = option(f)
    return f


def run_training(ctx: click.Context, role: str, distill: DistillParams | None, out: Path | None, teacher: Path | None, **kw) -> None:
    """`distill` None: the ground truth alone, and no distill.* key read (the teacher's stage does not depend on them)."""
    from kdas.data.manifest import data_id, read_manifest
    from kdas.io import file_sha256, folder_lock
    from kdas.models import resolve_backbone
    from kdas.models.registry import check_weights
    from kdas.tracking.runs import TrainingLog, bound_http_waits, stage_run
    from kdas.tracking.store import masked, tracking_uri
    from kdas.training import TrainJob
    from kdas.training import train as run_train
    from kdas.training.dvc_watchdog import stop_with_dvc
    from kdas.training.torchrun import relaunch_under_torchrun, under_torchrun

    params = params_of(ctx)
    if params.train.nproc_per_node > 1 and not under_torchrun():
        sys.exit(relaunch_under_torchrun(params.train.nproc_per_node))
    spec = getattr(params.model, role)
    check_weights(spec.weights, resolve_backbone(spec.arch, spec.backbone))  # in seconds, before MLflow or data
    out = out or Path("models") / role
    # the student draws from distill.seed, so a seed sweep re-trains students and reuses the teacher
    train_params = params.train.for_role(role) if distill is None else dataclasses.replace(params.train, seed=distill.seed)
    job = TrainJob(role=role, model=spec, manifest=read_manifest(kw["manifest"]), out_dir=out, train=train_params, distill=distill,
                   teacher=teacher, resume=kw["resume"], device=kw["device"], max_steps=kw["max_steps"], reference=params.monitor.reference)
    # SIGTERM ends training as SIGINT does, through its cleanups: the MLflow run ends KILLED, not RUNNING forever
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    stop_with_dvc()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone tracks, reports and writes
        run_train(job)
        return
    # the student's method and its own settings (distill.kd.temperature ...), not every method's
    settings = {"method": distill.method, "seed": distill.seed, distill.method: dataclasses.asdict(methods.method_params(distill))} if distill else None
    logged = {"role": role, "teacher": str(teacher or ""), "train": train_params, "model": spec, **({"distill": settings} if distill else {})}
    bound_http_waits()  # a tracking server that dies mid-training costs seconds per epoch, not the training
    with folder_lock(out, f"kdas train {role}"), \
            stage_run(f"train_{role}", logged, dvc_stage="train_teacher" if role == "teacher" else "distill") as run:
        # what the model file records of its origin: its MLflow run, its data, its teacher
        job.info = {"mlflow_run_id": run.info.run_id, "train_data": data_id(job.manifest[job.manifest["split"].isin(["train", "val"])])}
        if teacher is not None and job.method != "none":
            job.info |= {"teacher": str(teacher), "teacher_sha256": file_sha256(teacher)}
        job.on_epoch = epochs = TrainingLog()
        result = run_train(job)
        epochs({"best_val_meanDic": result.best_val_dice, "best_epoch": result.best_epoch})
        if result.best_path.exists():
            epochs.model(result.best_path)
        for name in ("history.csv", "history.png", "losses.csv", "metrics.json"):  # the weights go to the registry (kdas register)
            if (out / name).exists():
                epochs.artifact(out / name, artifact_path=role)
    click.echo(f"{role} ({spec.arch} on {spec.backbone}, method {job.method}): best val meanDic {result.best_val_dice:.4f} at epoch {result.best_epoch}/{result.epochs_run}")
    click.echo(f"  model:   {result.best_path}\n  metrics: {out / 'metrics.json'}, per epoch: {out / 'history.csv'} "
               f"(picture: {out / 'history.png'})")
    click.echo(f"  MLflow:  run {run.info.run_id} in {masked(tracking_uri())}")
    if missing := epochs.unlogged():
        click.secho(f"warning: {missing}", fg="yellow", err=True)


@train.command("teacher")
@_train_options
@click.pass_context
def train_teacher(ctx: click.Context, out: Path | None, **kw) -> None:
    """Train the teacher (model.teacher in params.yaml) on the ground truth."""
    run_training(ctx, "teacher", None, out, None, **kw)


@train.command("student")
@click.option("--teacher", "teacher_ref", default="models/teacher/best.pt", show_default=True,
              help="The teacher: a model file or an MLflow model URI (models:/kdas-teacher@champion).")
@click.option("--method", type=click.Choice(methods.names()), help="Override distill.method.")
@_train_options
@click.pass_context
def train_student(ctx: click.Context, teacher_ref: str, method: str | None, out: Path | None, **kw) -> None:
    """Distil the teacher into the student (model.student) with distill.method.

    The loss is the structure loss against the ground truth plus distill.<method>.weight
    times the method's teacher terms. none: the student alone; kd: + pixel distillation;
    sgm: + symmetrical guiding; kdas: + attention supervision + symmetrical guiding.
    """
    from kdas.tracking.references import resolve_model_file

    distill = params_of(ctx).distill
    distill = dataclasses.replace(distill, method=method or distill.method)
    methods.method_params(distill)  # a bad method or setting stops here, before the teacher is looked for
    teacher = None if distill.method == methods.NONE else resolve_model_file(teacher_ref)
    run_training(ctx, "student", distill, out, teacher, **kw)
