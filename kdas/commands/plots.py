"""`kdas plots`: the DVC plots, offline and as PNGs."""

from __future__ import annotations

from pathlib import Path

import click

from kdas.cli import REPORTS


@click.command("plots")
@click.argument("targets", nargs=-1)
@click.option("--out", default=Path("dvc_plots"), show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--png", default=REPORTS / "plots", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Also render each chart to PNG here.")
def plots_cmd(targets: tuple[str, ...], out: Path, png: Path) -> None:
    """`dvc plots show` that works offline (chart libraries inlined), plus PNGs.

    Open OUT/index.html in a browser; the PNGs are the same charts as files.
    """
    from kdas.evaluation.plots import show

    written = show(out, png, list(targets))
    click.echo("\n".join(f"  {p}" for p in written))
