"""`kdas data ...`: import, fetch or generate datasets and build the manifest (the synth
and manifest stages of dvc.yaml)."""

from __future__ import annotations

from pathlib import Path

import click

from kdas.cli import MANIFEST, RAW, params_of


@click.group()
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
