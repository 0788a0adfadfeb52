"""`kdas ...`: thin commands over the library; every default comes from params.yaml."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from kdas.config import DistillParams, Params, load_params, serving_limits
from kdas.maps import THRESHOLD
from kdas.methods import METHODS

ROLES = ("teacher", "student")
RAW = Path("data/raw")
MANIFEST = Path("data/manifest.parquet")
REPORTS = Path("reports")


class KdasGroup(click.Group):
    """Turns expected failures (bad data, bad params, missing files, a full disk, a failing
    tracking store) into one clear line and exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException):  # --help, usage errors: click's own
            raise
        except Exception as exc:
            line = None if ctx.obj and ctx.obj.get("debug") else _one_line(exc)
            if line is None:
                raise
            click.secho(f"error: {line}", fg="red", err=True)
            sys.exit(1)


def _one_line(exc: Exception) -> str | None:
    """What an expected failure says in one line; None for a bug (its traceback is wanted)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"disk full{where} (no space left on the device): free some space and run the command again; nothing half-written was kept"
    if isinstance(exc, (ValueError, FileNotFoundError, RuntimeError)):
        return str(exc)
    from kdas.tracking.store import store_error  # mlflow is imported only where its errors can arise

    return store_error(exc)


def params_of(ctx: click.Context) -> Params:
    """params.yaml, read and checked once per command."""
    root = ctx.find_root()
    if "params" not in root.obj:
        root.obj["params"] = load_params(root.obj["params_path"])
    return root.obj["params"]


@click.group(cls=KdasGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False), help="Parameters file.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, and full tracebacks on errors.")
@click.version_option(package_name="kdas")
@click.pass_context
def main(ctx: click.Context, params_path: str, verbose: bool) -> None:
    """KDAS polyp segmentation: data, distillation, evaluation and registry.

    Run from the project root. Each command is one pipeline stage (dvc.yaml wires them;
    `dvc repro` runs them all).
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("PIL", "matplotlib", "urllib3", "git", "alembic", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = {"params_path": params_path, "debug": verbose}


@main.group()
def data() -> None:
    """Import, fetch or generate datasets and build the manifest."""


@data.command("import")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("--name", help="Dataset name (default: recognised from the release, e.g. kvasir-seg).")
@click.option("--raw", default=RAW, show_default=True, type=click.Path(path_type=Path), help="Where datasets live.")
@click.option("--no-dvc", is_flag=True, help="Do not `dvc add` the imported folder.")
@click.pass_context
def data_import(ctx: click.Context, src: Path, name: str | None, raw: Path, no_dvc: bool) -> None:
    """Import a public release (folder or .zip) into data/raw/<name>.

    Recognises Kvasir-SEG, CVC-ClinicDB (PNG or TIFF), CVC-ColonDB, PraNet's
    TrainDataset/TestDataset trees and any images/ + masks/ pair.
    """
    from kdas.data.importer import import_dataset

    params = params_of(ctx)
    for path in import_dataset(src, raw, name=name, max_nonbinary=params.validation.max_nonbinary_fraction, track=not no_dvc):
        n = len(list((path / "images").iterdir()))
        click.echo(f"{path}: {n} image/mask pairs")
    click.echo("Next: list the dataset(s) under data.datasets in params.yaml, then `dvc repro`.")


@data.command("fetch")
@click.argument("name")
@click.option("--url", help="Download from this address instead of the catalogue's (a mirror).")
@click.option("--downloads", default=Path("data/downloads"), show_default=True, type=click.Path(path_type=Path))
@click.option("--no-dvc", is_flag=True, help="Do not `dvc add` the imported folder.")
@click.pass_context
def data_fetch(ctx: click.Context, name: str, url: str | None, downloads: Path, no_dvc: bool) -> None:
    """Download a catalogued public release (e.g. kvasir-seg) and import it."""
    from kdas.data.fetch import fetch
    from kdas.data.importer import import_dataset

    archive = fetch(name, downloads, url=url)
    click.echo(f"downloaded {archive}")
    params = params_of(ctx)
    for path in import_dataset(archive, RAW, name=name, max_nonbinary=params.validation.max_nonbinary_fraction, track=not no_dvc):
        click.echo(f"{path}: {len(list((path / 'images').iterdir()))} image/mask pairs")


@data.command("synth")
@click.option("--out", default=RAW / "synth", show_default=True, type=click.Path(path_type=Path))
@click.pass_context
def data_synth(ctx: click.Context, out: Path) -> None:
    """Generate the synthetic colonoscopy dataset (params.yaml: data.synth)."""
    from kdas.data.synth import write_synth

    p = params_of(ctx).data.synth
    write_synth(out, p)
    click.echo(f"{out}: {p.n_images} synthetic frames of {p.size} px (seed {p.seed})")


@data.command("manifest")
@click.option("--raw", default=RAW, show_default=True, type=click.Path(path_type=Path))
@click.option("--out", default=MANIFEST, show_default=True, type=click.Path(path_type=Path))
@click.pass_context
def data_manifest(ctx: click.Context, raw: Path, out: Path) -> None:
    """Describe every pair of the datasets in data.datasets and assign splits."""
    from kdas.data.manifest import build_manifest, read_manifest, write_manifest

    params = params_of(ctx)
    previous = read_manifest(out) if out.exists() else None
    df = build_manifest(raw, params.data.datasets, params.data.split, previous,
                        near_duplicate_distance=params.validation.near_duplicate_distance)
    write_manifest(df, out)
    counts = df.groupby(["dataset", "split"]).size().unstack(fill_value=0)
    click.echo(f"{out}: {len(df)} pairs\n{counts.to_string()}")


@main.command()
@click.option("--manifest", default=MANIFEST, show_default=True, type=click.Path(path_type=Path))
@click.option("--reports", default=REPORTS, show_default=True, type=click.Path(path_type=Path))
@click.option("--show", default=20, show_default=True, help="Findings printed (all are in the report).")
@click.pass_context
def validate(ctx: click.Context, manifest: Path, reports: Path, show: int) -> None:
    """Check the data contract; exit 1 naming each failing file and rule.

    Writes reports/validation.json and reports/validation.html.
    """
    from kdas.data.manifest import read_manifest
    from kdas.validation import validate_manifest, write_report

    report = validate_manifest(read_manifest(manifest), params_of(ctx).validation)
    write_report(report, reports / "validation.json", reports / "validation.html")
    for f in report.errors[:show] + report.warnings[: max(0, show - len(report.errors))]:
        click.secho(f"{f.severity}: [{f.rule}] {f.file}: {f.detail}", fg="red" if f.severity == "error" else "yellow", err=True)
    hidden = len(report.findings) - min(len(report.findings), show)
    if hidden > 0:
        click.echo(f"... {hidden} more findings in {reports / 'validation.html'}", err=True)
    verdict = "passed" if report.success else "FAILED"
    click.echo(f"data contract {verdict}: {report.n_pairs} pairs, {len(report.errors)} errors, {len(report.warnings)} warnings "
               f"(report: {reports / 'validation.html'})")
    if not report.success:
        sys.exit(1)


@main.group()
def params() -> None:
    """Named parameter profiles (params.yaml `profiles:`)."""


@params.command("use")
@click.argument("name")
@click.pass_context
def params_use(ctx: click.Context, name: str) -> None:
    """Write profile NAME (e.g. paper, real-cpu) into params.yaml.

    Like `dvc exp run -S`, the keys are written into the file, so params.yaml always says
    what runs and DVC re-runs exactly the stages whose keys changed.
    """
    from kdas.config import use_profile

    updates = use_profile(name, ctx.obj["params_path"])
    click.echo(f"{ctx.obj['params_path']}: profile {name}\n" + "\n".join(f"  {k}: {v}" for k, v in updates.items()))
    click.echo("Next: `dvc repro` (or `python -m pipelines.retrain`).")


@main.command("plots")
@click.argument("targets", nargs=-1)
@click.option("--out", default=Path("dvc_plots"), show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--png", default=REPORTS / "plots", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Also render each chart to PNG here.")
def plots_cmd(targets: tuple[str, ...], out: Path, png: Path) -> None:
    """`dvc plots show` that works offline (chart libraries inlined), plus PNGs.

    Open OUT/index.html in a browser; the PNGs are the same charts as files.
    """
    from kdas.plots import show

    written = show(out, png, list(targets))
    click.echo("\n".join(f"  {p}" for p in written))


@main.command("import-teacher")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", default=Path("models/teacher/best.pt"), show_default=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--backbone", default="pvt_v2_b2", show_default=True, help="The backbone the checkpoint was trained on.")
@click.option("--image-size", default=352, show_default=True, help="The size it was trained at.")
def import_teacher(checkpoint: Path, out: Path, backbone: str, image_size: int) -> None:
    """Turn an official Polyp-PVT checkpoint (PolypPVT.pth) into a kdas model file.

    The result is usable as `kdas train student --teacher OUT`.
    """
    from kdas.checkpoint import save_model
    from kdas.config import check_image_size
    from kdas.models.official import load_official_checkpoint

    check_image_size(image_size, "--image-size")  # before the seconds of conversion
    model = load_official_checkpoint(checkpoint, backbone=backbone)
    path = save_model(out, model, image_size=image_size, info={"role": "teacher", "source": f"official Polyp-PVT checkpoint {checkpoint.name}"})
    click.echo(f"{checkpoint} -> {path} (Polyp-PVT on {backbone}, {image_size} px); distil from it with "
               f"`kdas train student --teacher {path}`")


@main.group()
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


def _stop_with_dvc(poll_s: float = 2.0) -> None:
    """Under `dvc repro` (DVC sets DVC_STAGE), SIGTERM this process once that dvc is gone: a
    SIGKILLed dvc left its training running on as an orphan, outside any DVC run."""
    import threading

    import psutil

    if "DVC_STAGE" not in os.environ:
        return
    dvc = next((p for p in psutil.Process().parents() if any(Path(arg).name == "dvc" for arg in _cmdline(p))), None)
    if dvc is None:
        return

    def watch() -> None:
        while True:
            try:
                if not dvc.is_running() or dvc.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(poll_s)
        logging.getLogger(__name__).warning("dvc (pid %d) that ran this stage is gone: stopping", dvc.pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="dvc-watch", daemon=True).start()


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def _run_training(ctx: click.Context, role: str, distill: DistillParams | None, out: Path | None, teacher: Path | None, **kw) -> None:
    """`distill` None: the ground truth alone, and no distill.* key read (the teacher's stage does not depend on them)."""
    import hashlib

    from kdas.data.manifest import data_id, read_manifest
    from kdas.io import folder_lock
    from kdas.models import resolve_backbone
    from kdas.models.registry import check_weights
    from kdas.tracking.runs import TrainingLog, bound_http_waits, stage_run
    from kdas.tracking.store import tracking_uri
    from kdas.training import TrainJob, train as run_train

    params = params_of(ctx)
    if params.train.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        # the same command, data-parallel: torchrun starts one copy per process (NCCL on GPUs, gloo on CPU)
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={params.train.nproc_per_node}",
                  "-m", "kdas", *sys.argv[1:]]
        sys.exit(subprocess.call(launch))
    spec = getattr(params.model, role)
    check_weights(spec.weights, resolve_backbone(spec.arch, spec.backbone))  # in seconds, before MLflow or data
    out = out or Path("models") / role
    # the student draws from distill.seed, so a seed sweep re-trains students and reuses the teacher
    train_params = params.train.for_role(role) if distill is None else dataclasses.replace(params.train, seed=distill.seed)
    job = TrainJob(role=role, model=spec, manifest=read_manifest(kw["manifest"]), out_dir=out, train=train_params, distill=distill,
                   teacher=teacher, resume=kw["resume"], device=kw["device"], max_steps=kw["max_steps"])
    # SIGTERM ends training as SIGINT does, through its cleanups: the MLflow run ends KILLED, not RUNNING forever
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    _stop_with_dvc()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone tracks, reports and writes
        run_train(job)
        return
    logged = {"role": role, "teacher": str(teacher or ""), "train": train_params, "model": spec, **({"distill": distill} if distill else {})}
    bound_http_waits()  # a tracking server that dies mid-training costs seconds per epoch, not the training
    with folder_lock(out, f"kdas train {role}"), \
            stage_run(f"train_{role}", logged, dvc_stage="train_teacher" if role == "teacher" else "distill") as run:
        # what the model file records of its origin: its MLflow run, its data, its teacher
        job.info = {"mlflow_run_id": run.info.run_id, "train_data": data_id(job.manifest[job.manifest["split"].isin(["train", "val"])])}
        if teacher is not None and job.method != "none":
            job.info |= {"teacher": str(teacher), "teacher_sha256": hashlib.sha256(Path(teacher).read_bytes()).hexdigest()}
        job.on_epoch = epochs = TrainingLog()
        result = run_train(job)
        epochs({"best_val_meanDic": result.best_val_dice, "best_epoch": result.best_epoch})
        for name in ("history.csv", "history.png", "metrics.json"):  # the weights go to the registry (kdas register)
            if (out / name).exists():
                epochs.artifact(out / name, artifact_path=role)
    click.echo(f"{role} ({spec.arch} on {spec.backbone}, method {job.method}): best val meanDic {result.best_val_dice:.4f} at epoch {result.best_epoch}/{result.epochs_run}")
    click.echo(f"  model:   {result.best_path}\n  metrics: {out / 'metrics.json'}, per epoch: {out / 'history.csv'} "
               f"(picture: {out / 'history.png'})")
    click.echo(f"  MLflow:  run {run.info.run_id} in {tracking_uri()}")
    if missing := epochs.unlogged():
        click.secho(f"warning: {missing}", fg="yellow", err=True)


@train.command("teacher")
@_train_options
@click.pass_context
def train_teacher(ctx: click.Context, out: Path | None, **kw) -> None:
    """Train the teacher (model.teacher in params.yaml) on the ground truth."""
    _run_training(ctx, "teacher", None, out, None, **kw)


@train.command("student")
@click.option("--teacher", "teacher_ref", default="models/teacher/best.pt", show_default=True,
              help="The teacher: a model file or an MLflow model URI (models:/kdas-teacher@champion).")
@click.option("--method", type=click.Choice(METHODS), help="Override distill.method.")
@_train_options
@click.pass_context
def train_student(ctx: click.Context, teacher_ref: str, method: str | None, out: Path | None, **kw) -> None:
    """Distil the teacher into the student (model.student) with distill.method.

    none: the student alone on the ground truth; sgm: + symmetrical guiding;
    kdas: + attention supervision + symmetrical guiding.
    """
    from kdas.tracking.references import resolve_model_file

    distill = params_of(ctx).distill
    distill = dataclasses.replace(distill, method=method or distill.method)
    teacher = None if distill.method == "none" else resolve_model_file(teacher_ref)
    _run_training(ctx, "student", distill, out, teacher, **kw)


def _role_option(f):
    return click.option("--role", type=click.Choice(ROLES), default="student", show_default=True, help="Which model.")(f)


def _registry_name(ctx: click.Context, role: str) -> str:
    r = params_of(ctx).register
    return r.student_name if role == "student" else r.teacher_name


@main.command()
@_role_option
@click.option("--model", "model_ref", help="Model file or MLflow URI (default: models/<role>/best.pt).")
@click.option("--manifest", default=MANIFEST, show_default=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Report folder (default: reports/evaluate/<role>).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda, mps, cpu) or a torch device.")
@click.pass_context
def evaluate(ctx: click.Context, role: str, model_ref: str | None, manifest: Path, out: Path | None, device: str) -> None:
    """Score a model on every test set by the standard protocol.

    Writes metrics.json (per test set and their mean, with efficiency figures),
    per_image.csv, curves.csv/.png, datasets.csv/.png, grid.png (worst and best cases, overlaid
    at threshold 0.5) and compare.png (teacher vs student, once both roles are evaluated).
    """
    from kdas.data.manifest import read_manifest
    from kdas.evaluation import evaluate_model
    from kdas.inference import Segmenter
    from kdas.tracking.references import resolve_model_file
    from kdas.tracking.runs import log_artifacts, log_metrics, model_run

    params = params_of(ctx)
    model_ref = model_ref or f"models/{role}/best.pt"
    out = out or REPORTS / "evaluate" / role
    model_file = resolve_model_file(model_ref)
    seg = Segmenter.load(model_file, device)
    with model_run(seg.info.get("mlflow_run_id"), f"evaluate_{role}", {"evaluate": params.evaluate},
                           dvc_stage=f"evaluate@{role}"):
        result = evaluate_model(seg, read_manifest(manifest), out, batch_size=params.evaluate.batch_size, grid_size=params.evaluate.grid_size)
        log_metrics({"test": result["datasets"], "test_published": result["published"],
                     "efficiency": {k: v for k, v in result["efficiency"].items() if k != "device"}})
        log_artifacts(out, artifact_path=f"evaluate/{role}")
    table = "\n".join(f"  {d:<20} meanDic {m['meanDic']:.4f} (published maps {result['published'][d]['meanDic']:.4f})  "
                      f"meanIoU {m['meanIoU']:.4f}  wFm {m['wFm']:.4f}  Sm {m['Sm']:.4f}  MAE {m['mae']:.4f}"
                      for d, m in result["datasets"].items())
    e = result["efficiency"]
    click.echo(f"{role} on the test sets:\n{table}")
    click.echo(f"  {e['params_m']:.2f}M params, {e['gmacs']:.2f} GMACs at {e['image_size']} px; on {e['device']}: "
               f"{e['latency_ms']:.1f} ms/image, {e['throughput']:.1f} images/s, peak {e['peak_memory_mb']:.0f} MB")
    click.echo(f"  reports: {out}/ (metrics.json, per_image.csv, curves.png, datasets.png, grid.png)")


@main.command("metrics")
@click.argument("pred_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("gt_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the figures here.")
def metrics_cmd(pred_dir: Path, gt_dir: Path, json_out: Path | None) -> None:
    """Score saved prediction maps (8-bit PNG, value/255 = probability) against masks.

    Pairs are matched by file name without extension; sizes must match.
    """
    from kdas.io import write_text
    from kdas.metrics import evaluate_folders

    evaluator = evaluate_folders(pred_dir, gt_dir)
    summary = evaluator.summary()
    click.echo(f"{len(evaluator)} images")
    for k, v in summary.items():
        click.echo(f"  {k:<8} {v:.4f}")
    if json_out:
        per_image = evaluator.per_image().set_index("name").to_dict("index")
        write_text(json_out, json.dumps({"dataset": summary, "per_image": per_image}, indent=1))


@main.command()
@_role_option
@click.option("--model", "model_file", type=click.Path(dir_okay=False, path_type=Path), help="Default: models/<role>/best.pt.")
@click.option("--metrics", "metrics_file", type=click.Path(dir_okay=False, path_type=Path), help="Default: reports/evaluate/<role>/metrics.json.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Where the version is recorded (default: reports/register/<role>.json).")
@click.pass_context
def register(ctx: click.Context, role: str, model_file: Path | None, metrics_file: Path | None, out: Path | None) -> None:
    """Log the model to MLflow and register it as a new version, alias `challenger`.

    The version is logged in the model's training run and carries its data, commit, params
    and metrics; registering the same model file again adds no version.
    """
    from kdas.io import write_text
    from kdas.tracking.registry import register_model

    params = params_of(ctx)
    model_file = model_file or Path("models") / role / "best.pt"
    metrics_file = metrics_file or REPORTS / "evaluate" / role / "metrics.json"
    if not metrics_file.exists():
        raise FileNotFoundError(f"{metrics_file}: no evaluation; run `kdas evaluate --role {role}` first")
    evaluation = json.loads(metrics_file.read_text())
    tests = {d: m for d, m in evaluation["datasets"].items() if d != "mean"}
    name = _registry_name(ctx, role)
    version = register_model(model_file, name, tests, evaluation_data=evaluation["data"], teacher_name=params.register.teacher_name,
                             serving_config=serving_limits(params.serve, params.validation.max_size))
    out = out or REPORTS / "register" / f"{role}.json"
    write_text(out, json.dumps({"name": version.name, "version": version.version, "run_id": version.run_id, "model_uri": version.model_uri}, indent=2))
    again = " (this model file was registered before: no new version)" if version.existed else ""
    click.echo(f"registered {version.model_uri}{again} (alias challenger); promote it with `kdas promote --role {role}`")


@main.command()
@_role_option
@click.option("--version", "version", help="The version to decide on (default: the one this workspace registered, "
                                           "in reports/register/<role>.json).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Decision record (default: reports/promotion/<role>.json).")
@click.pass_context
def promote(ctx: click.Context, role: str, version: str | None, out: Path | None) -> None:
    """Move `champion` to a registered version if it passes the gate in params.yaml (register.gate).

    The version this workspace registered, never the `challenger` alias: another run may
    have moved it. Like for like: a champion scored on other test data is first evaluated on this
    workspace's test sets. Exits 0 either way; the decision and its evidence are printed, written to --out and
    tagged on the model version.
    """
    from dataclasses import asdict

    from kdas.io import write_text
    from kdas.tracking import registry
    from kdas.tracking.references import resolve_model_file

    params = params_of(ctx)

    def evaluate_champion(uri: str) -> tuple[dict[str, float], str]:
        """The champion on the challenger's test sets (this workspace's manifest)."""
        from kdas.data.manifest import read_manifest
        from kdas.evaluation import evaluate_model
        from kdas.inference import Segmenter

        click.echo(f"{uri} was scored on other data: evaluating it on this workspace's test sets first")
        seg = Segmenter.load(resolve_model_file(uri))
        result = evaluate_model(seg, read_manifest(MANIFEST), REPORTS / "promotion" / f"{role}-champion",
                                batch_size=params.evaluate.batch_size, grid_size=params.evaluate.grid_size)
        return result["datasets"]["mean"], result["data"]

    name = _registry_name(ctx, role)
    if version is None:
        registered = REPORTS / "register" / f"{role}.json"
        record = json.loads(registered.read_text()) if registered.exists() else {}
        if record.get("name") != name:
            raise click.ClickException(f"{registered}: no version of {name} registered here; run `kdas register --role {role}` "
                                       "first, or pass --version")
        version = str(record["version"])
    decision = registry.promote(name, params.register.gate, evaluate_champion, version=version)
    out = out or REPORTS / "promotion" / f"{role}.json"
    write_text(out, json.dumps(asdict(decision), indent=2))
    verdict = "promoted" if decision.promoted else "not promoted"
    click.echo(f"{name} version {decision.challenger}: {verdict}: {decision.reason}")


@main.command()
@_role_option
@click.pass_context
def rollback(ctx: click.Context, role: str) -> None:
    """Put `champion` back on the version that held it before."""
    from kdas.tracking import registry

    name = _registry_name(ctx, role)
    version = registry.rollback(name)
    click.echo(f"{name}: champion is version {version} again")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_ref",
              help="Model file, MLflow URI, or an ONNX export (.onnx, runs on onnxruntime). Default: the student's champion, "
                   "models:/<register.student_name>@champion.")
@click.option("--out", default=Path("predictions"), show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--threshold", default=THRESHOLD, show_default=True, type=click.FloatRange(0, 1), help="Mask threshold on the probability.")
@click.option("--device", default="auto", show_default=True)
@click.pass_context
def predict(ctx: click.Context, images: tuple[Path, ...], model_ref: str | None, out: Path, threshold: float, device: str) -> None:
    """Segment images: writes <stem>_mask.png (0/255) and <stem>_overlay.jpg to --out.

    A .onnx --model (from `kdas export`) runs on onnxruntime, without PyTorch.
    """
    import numpy as np
    from PIL import Image

    from kdas.io import read_rgb

    if model_ref is None:  # the project's champion student: needs the project's params.yaml
        from kdas.promotion import CHAMPION

        if not Path(ctx.find_root().obj["params_path"]).exists():
            raise click.UsageError("no --model given and no params.yaml here: pass --model FILE_OR_URI, or run in a kdas project")
        model_ref = f"models:/{params_of(ctx).register.student_name}@{CHAMPION}"

    if is_onnx_file(model_ref):  # onnxruntime: no torch on this path
        from kdas.export import OnnxSegmenter

        seg = OnnxSegmenter.load(model_ref, device)
    else:
        from kdas.inference import Segmenter
        from kdas.tracking.references import resolve_model_file
        from kdas.tracking.registry import version_summary

        model_file = resolve_model_file(model_ref)
        seg = Segmenter.load(model_file, device)
        info = seg.info
        click.echo(version_summary(model_ref) or
                   f"model {model_file}: trained on {info.get('train_data', 'unknown data')} (MLflow run {info.get('mlflow_run_id', '?')})")
    # in a project, the sides params.yaml allows (a 9000 px square PNG of 258 KB took 8 GB); elsewhere, the pixel bound alone
    max_side = params_of(ctx).validation.max_size if Path(ctx.find_root().obj["params_path"]).exists() else None
    out.mkdir(parents=True, exist_ok=True)
    for path in images:
        image = read_rgb(path, max_side)
        mask = seg.predict([image])[0] >= threshold
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"{path.stem}_mask.png")
        overlay = image.copy()
        overlay[mask] = (0.5 * overlay[mask] + 0.5 * np.array([0, 255, 0])).astype(np.uint8)
        Image.fromarray(overlay).save(out / f"{path.stem}_overlay.jpg", quality=90)
        click.echo(f"{path}: polyp covers {mask.mean():.1%} -> {out / (path.stem + '_mask.png')}")


def is_onnx_file(ref: str) -> bool:
    """A local .onnx path (not an MLflow URI), run on onnxruntime."""
    return str(ref).lower().endswith(".onnx") and ":/" not in str(ref)


@main.command("export")
@click.option("--model", "model_ref", default="models/student/best.pt", show_default=True,
              help="Model file or MLflow URI (models:/kdas-student@champion).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .onnx file to write.")
@click.option("--int8", "int8", is_flag=True, help="Static int8 quantisation, calibrated on train-split images.")
@click.option("--manifest", default=MANIFEST, show_default=True, type=click.Path(path_type=Path),
              help="Where --int8 draws calibration images from (the train split only).")
@click.option("--calibration-images", default=32, show_default=True, type=click.IntRange(1), help="How many (--int8).")
@click.option("--seed", default=0, show_default=True, help="Which calibration images (--int8).")
def export_cmd(model_ref: str, out: Path, int8: bool, manifest: Path, calibration_images: int, seed: int) -> None:
    """Export a model to ONNX (dynamic batch, its training size, metadata) for onnxruntime.

    The graph takes RGB in [0, 1] (normalisation inside) and returns logits (P1 + P2) and
    map (sigmoid). `kdas predict IMG --model OUT.onnx` runs it without PyTorch.
    """
    import tempfile

    from kdas import export
    from kdas.data.manifest import read_manifest
    from kdas.tracking.references import is_model_uri, resolve_model_file

    if out.suffix.lower() != ".onnx":
        raise ValueError(f"{out}: the output must be a .onnx file")
    images = None
    if int8:  # the calibration set first: a missing manifest fails before the export's seconds
        images = export.calibration_images(read_manifest(manifest), calibration_images, seed)
    model_file = resolve_model_file(model_ref)
    source = model_ref if is_model_uri(model_ref) else str(model_file)
    if not int8:
        export.export_onnx(model_file, out, source=source)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export.export_onnx(model_file, Path(tmp) / "fp32.onnx", source=source)
            export.quantize_int8(fp32, out, images)
    meta = export.read_metadata(out)
    click.echo(f"{model_ref} -> {out} ({meta['precision']}, {meta['arch']} on {meta['backbone']}, {meta['image_size']} px, "
               f"{out.stat().st_size / 1e6:.1f} MB); run it with `kdas predict IMAGE --model {out}`")
