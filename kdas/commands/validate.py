"""`kdas validate`: the data contract over the manifest (the validate stage)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kdas.cli import MANIFEST, REPORTS, params_of


@click.command()
@click.option("--manifest", default=MANIFEST, show_default=True, type=click.Path(path_type=Path))
@click.option("--reports", default=REPORTS, show_default=True, type=click.Path(path_type=Path))
@click.option("--show", default=20, show_default=True, help="Findings printed (all are in the report).")
@click.pass_context
def validate(ctx: click.Context, manifest: Path, reports: Path, show: int) -> None:
    """Check the data contract; exit 1 naming each failing file and rule.

    Writes reports/validation.json and reports/validation.html.
    """
    from kdas.data.manifest import read_manifest
    from kdas.data.validation import validate_manifest, write_report

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
