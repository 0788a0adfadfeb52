"""`kdas evaluate`: a model on every test set (the evaluate stages)."""

from __future__ import annotations

from pathlib import Path

import click

from kdas.cli import MANIFEST, REPORTS, params_of, role_option


@click.command()
@role_option
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
    from kdas.evaluation.evaluate import evaluate_model
    from kdas.io import file_sha256
    from kdas.serving.inference import Segmenter
    from kdas.tracking.references import resolve_model_file
    from kdas.tracking.runs import log_artifacts, log_metrics, model_run

    params = params_of(ctx)
    model_ref = model_ref or f"models/{role}/best.pt"
    out = out or REPORTS / "evaluate" / role
    model_file = resolve_model_file(model_ref)
    seg = Segmenter.load(model_file, device)
    with model_run(seg.info.get("mlflow_run_id"), f"evaluate_{role}", {"evaluate": params.evaluate},
                   dvc_stage=f"evaluate@{role}", model_sha256=file_sha256(model_file)):
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
