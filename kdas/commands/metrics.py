"""`kdas metrics`: score saved prediction maps against masks."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("metrics")
@click.argument("pred_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("gt_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the figures here.")
def metrics_cmd(pred_dir: Path, gt_dir: Path, json_out: Path | None) -> None:
    """Score saved prediction maps (8-bit PNG, value/255 = probability) against masks.

    Pairs are matched by file name without extension; sizes must match.
    """
    from kdas.evaluation.metrics import evaluate_folders
    from kdas.io import write_text

    evaluator = evaluate_folders(pred_dir, gt_dir)
    summary = evaluator.summary()
    click.echo(f"{len(evaluator)} images")
    for k, v in summary.items():
        click.echo(f"  {k:<8} {v:.4f}")
    if json_out:
        per_image = evaluator.per_image().set_index("name").to_dict("index")
        write_text(json_out, json.dumps({"dataset": summary, "per_image": per_image}, indent=1))
