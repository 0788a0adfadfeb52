"""`kdas register`: a new registry version of an evaluated model (the register stages)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kdas.cli import REPORTS, params_of, registry_name, role_option
from kdas.config import serving_limits


@click.command()
@role_option
@click.option("--model", "model_file", type=click.Path(dir_okay=False, path_type=Path), help="Default: models/<role>/best.pt.")
@click.option("--metrics", "metrics_file", type=click.Path(dir_okay=False, path_type=Path), help="Default: reports/evaluate/<role>/metrics.json.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Where the version is recorded (default: reports/register/<role>.json).")
@click.pass_context
def register(ctx: click.Context, role: str, model_file: Path | None, metrics_file: Path | None, out: Path | None) -> None:
    """Log the model to MLflow and register it as a new version, alias `challenger`.

    The version is logged in the model's training run and carries its data, commit, params
    and metrics; registering the same model file again adds no version.
    """
    from kdas.io import file_sha256, write_text
    from kdas.tracking.registry import register_model

    params = params_of(ctx)
    model_file = model_file or Path("models") / role / "best.pt"
    metrics_file = metrics_file or REPORTS / "evaluate" / role / "metrics.json"
    if not metrics_file.exists():
        raise FileNotFoundError(f"{metrics_file}: no evaluation; run `kdas evaluate --role {role}` first")
    evaluation = json.loads(metrics_file.read_text())
    tests = {d: m for d, m in evaluation["datasets"].items() if d != "mean"}
    name = registry_name(ctx, role)
    version = register_model(model_file, name, tests, evaluation_data=evaluation["data"], teacher_name=params.register.teacher_name,
                             serving_config=serving_limits(params.serve, params.validation.max_size), onnx=params.register.onnx)
    out = out or REPORTS / "register" / f"{role}.json"
    # what `kdas promote` checks the store's version against: a number alone names no model
    write_text(out, json.dumps({"name": version.name, "version": version.version, "run_id": version.run_id, "model_uri": version.model_uri,
                                "model_file": str(model_file), "sha256": file_sha256(model_file)}, indent=2))
    again = " (this model file was registered before: no new version)" if version.existed else ""
    click.echo(f"registered {version.model_uri}{again} (alias challenger); promote it with `kdas promote --role {role}`")
