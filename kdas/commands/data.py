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
    TrainDataset/TestDataset trees and any images/ + masks/ pair. With a Prefect API
    configured (PREFECT_API_URL), an import that changes a dataset emits the Prefect event
    kdas.data.changed, on which prefect.yaml's `on-new-data` deployment retrains.
    """
    from kdas.data.importer import import_dataset

    params = params_of(ctx)
    before = _pairs(raw)
    for path in import_dataset(src, raw, name=name, max_nonbinary=params.validation.max_nonbinary_fraction, track=not no_dvc):
        _announce(path, before.get(path.name, (set(), None)))
    click.echo("Next: list the dataset(s) under data.datasets in params.yaml, then `dvc repro`.")


def _pairs(raw: Path) -> dict[str, tuple[set[str], str | None]]:
    """Each dataset's image names and DVC hash, before an import changes them."""
    if not raw.is_dir():
        return {}
    return {d.name: ({p.name for p in (d / "images").iterdir()}, _dvc_md5(d)) for d in raw.iterdir() if (d / "images").is_dir()}


def _dvc_md5(path: Path) -> str | None:
    import yaml

    dvc_file = path.with_name(f"{path.name}.dvc")
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") if dvc_file.is_file() else None
    return outs[0].get("md5") if outs else None


def _announce(path: Path, before: tuple[set[str], str | None]) -> None:
    """Say what the import wrote and, where it changed the dataset, emit kdas.data.changed
    (its DVC hash, the number of new pairs) for the deployment that retrains on new data."""
    from kdas.events import HOW_TO, emit

    names, md5 = {p.name for p in (path / "images").iterdir()}, _dvc_md5(path)
    payload = {"dataset": path.name, "dvc_md5": md5, "pairs": len(names), "new_pairs": len(names - before[0]),
               "workspace": str(Path.cwd().resolve())}  # the project the import ran in: where the triggered flow runs
    click.echo(f"{path}: {len(names)} image/mask pairs ({payload['new_pairs']} new)")
    if (names, md5) == before and md5 is not None:
        return  # the same data again: nothing to retrain on
    if not emit("kdas.data.changed", f"kdas.dataset.{path.name}", payload):
        click.echo(f"(the event kdas.data.changed was not sent: {HOW_TO}; prefect.yaml's on-new-data deployment retrains on it)")


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
    before = _pairs(RAW)
    for path in import_dataset(archive, RAW, name=name, max_nonbinary=params.validation.max_nonbinary_fraction, track=not no_dvc):
        _announce(path, before.get(path.name, (set(), None)))


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
