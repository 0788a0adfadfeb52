"""`kdas ...`: thin commands over the library; every default comes from params.yaml."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from kdas.config import Params, load_params

RAW = Path("data/raw")
MANIFEST = Path("data/manifest.parquet")
REPORTS = Path("reports")


class KdasGroup(click.Group):
    """Turns expected failures (bad data, bad params, missing files) into one clear line and exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (ValueError, FileNotFoundError, RuntimeError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)


def params_of(ctx: click.Context) -> Params:
    return load_params(ctx.obj["params_path"])


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
    df = build_manifest(raw, params.data.datasets, params.data.split, previous)
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
