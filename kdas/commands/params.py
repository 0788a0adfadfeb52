"""`kdas params use`: write a named profile into params.yaml."""

from __future__ import annotations

import click


@click.group()
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
