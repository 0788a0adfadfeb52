"""`kdas monitor`: do new frames still look like the model's training frames?"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kdas.cli import params_of


@click.command("monitor")
@click.argument("images_dir", type=click.Path(path_type=Path))
@click.option("--model", "model_ref", default="models/student/best.pt", show_default=True,
              help="A model file or a registered model (models:/kdas-student@champion): its reference profile is the baseline.")
@click.option("--out", default=Path("reports/monitor"), show_default=True, type=click.Path(path_type=Path),
              help="Where drift.json, report.html and evidently.html go.")
@click.option("--max-frames", default=500, show_default=True, type=click.IntRange(1),
              help="Profile at most this many frames (the last ones by name).")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-mlflow", is_flag=True, help="Do not log the score to MLflow.")
@click.pass_context
def monitor(ctx: click.Context, images_dir: Path, model_ref: str, out: Path, max_frames: int, device: str, no_mlflow: bool) -> None:
    """Compare the frames in IMAGES_DIR with the model's training frames and say whether they drifted.

    IMAGES_DIR is a folder of new frames (PNG, JPEG, TIFF), or the folder a served model logs
    to (its frames.jsonl). Each frame is profiled as the model's training frames were when it
    was trained (brightness, contrast, colour, sharpness, size, the model's encoder embedding
    and its prediction's statistics) and Evidently tests each feature; drift when at least
    monitor.drift_share of them drifted (params.yaml). Writes OUT/drift.json, OUT/report.html;
    logs the score to MLflow against the model's version. Exit 0 with or without drift, 2 on bad
    input. With a Prefect API configured, a drift emits the event kdas.drift.detected.
    """
    from kdas.monitoring.watch import watch
    from kdas.tracking.references import resolve_model_file

    try:
        model_file = resolve_model_file(model_ref)
        verdict = watch(images_dir, model_file, out, max_frames=max_frames, device=device,
                        drift_share=params_of(ctx).monitor.drift_share, name=model_ref)
    except (ValueError, FileNotFoundError) as exc:  # bad input: its one line, exit 2
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    if not no_mlflow:
        from kdas.tracking.drift import log_verdict

        log_verdict(verdict, model_ref, model_file, out)
    summary = verdict.to_json()
    if verdict.drift:
        from kdas.events import emit

        emit("kdas.drift.detected", f"kdas.model.{model_ref}",
             {"score": verdict.score, "drifted": summary["drifted"], "frames": verdict.frames, "images": str(images_dir)})
    click.echo(f"{'DRIFT' if verdict.drift else 'no drift'}: {len(summary['drifted'])} of {len(verdict.features)} features "
               f"drifted (score {verdict.score:.2f}; {', '.join(summary['drifted']) or 'none'}) in {verdict.frames} frames "
               f"against {verdict.reference_frames} training frames")
    click.echo(f"wrote {out / 'drift.json'} and {out / 'report.html'}")
