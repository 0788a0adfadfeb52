"""`kdas promote` and `kdas rollback`: where the `champion` alias stands."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kdas.cli import MANIFEST, REPORTS, params_of, registry_name, role_option


@click.command()
@role_option
@click.option("--version", "version", help="The version to decide on (default: the one this workspace registered, "
                                           "in reports/register/<role>.json).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Decision record (default: reports/promotion/<role>.json).")
@click.pass_context
def promote(ctx: click.Context, role: str, version: str | None, out: Path | None) -> None:
    """Move `champion` to a registered version if it passes the gate in params.yaml (register.gate).

    The version this workspace registered, never the `challenger` alias: another run may
    have moved it. Like for like: a champion scored on other test data is first evaluated on this
    workspace's test sets. Exits 0 either way; the decision and its evidence are printed, written to --out and
    tagged on the model version.
    """
    from dataclasses import asdict

    from kdas.io import write_text
    from kdas.tracking.promote import promote as promote_version
    from kdas.tracking.references import resolve_model_file
    from kdas.tracking.rules import gate_rules

    params = params_of(ctx)
    rules = gate_rules(params.register.gate, ctx.find_root().obj["params_path"])  # a bad rule stops here, before the registry

    def evaluate_champion(uri: str) -> tuple[dict[str, dict[str, float]], str]:
        """The champion on the challenger's test sets (this workspace's manifest): every metric per set."""
        from kdas.data.manifest import read_manifest
        from kdas.evaluation.evaluate import evaluate_model
        from kdas.serving.inference import Segmenter

        click.echo(f"{uri} was scored on other data: evaluating it on this workspace's test sets first")
        seg = Segmenter.load(resolve_model_file(uri))
        result = evaluate_model(seg, read_manifest(MANIFEST), REPORTS / "promotion" / f"{role}-champion",
                                batch_size=params.evaluate.batch_size, grid_size=params.evaluate.grid_size)
        return result["datasets"], result["data"]

    name = registry_name(ctx, role)
    registered = REPORTS / "register" / f"{role}.json"
    record = json.loads(registered.read_text()) if registered.exists() else {}
    if version is None:
        if record.get("name") != name:
            raise click.ClickException(f"{registered}: no version of {name} registered here; run `kdas register --role {role}` "
                                       "first, or pass --version")
        version = str(record["version"])
    if record.get("name") == name and str(record.get("version")) == version:
        _check_own(registered, record, role)
    decision = promote_version(name, rules, evaluate_champion, version=version)
    out = out or REPORTS / "promotion" / f"{role}.json"
    write_text(out, json.dumps(asdict(decision), indent=2))
    verdict = "promoted" if decision.promoted else "not promoted"
    click.echo(f"{name} version {decision.challenger}: {verdict}: {decision.reason}")


def _check_own(registered: Path, record: dict, role: str) -> None:
    """The version this workspace recorded is its model, in this store: its model file is the
    one it registered, and the store's version of that number is that file (another
    workspace's store may hold another model under the same number). Otherwise nothing moves:
    the promotion policy is to promote only what this workspace registered where it registered it."""
    from kdas.io import file_sha256
    from kdas.tracking.registry import RegistryError, check_registered

    again = f"run `kdas register --role {role}` (or `dvc repro --force --single-item register@{role}`), then promote"
    if "sha256" not in record:
        raise click.ClickException(f"{registered}: written by an older kdas, with no model digest to check; {again}")
    model_file = Path(record["model_file"])
    if model_file.exists() and file_sha256(model_file) != record["sha256"]:
        raise click.ClickException(f"{registered}: {model_file} is not the model this record registered (it changed since, or its "
                                   f"registration failed); {again}")
    try:
        check_registered(record["name"], str(record["version"]), record["sha256"], record.get("run_id"))
    except RegistryError as exc:
        raise click.ClickException(f"{registered}: {exc}; {again}") from None


@click.command()
@role_option
@click.pass_context
def rollback(ctx: click.Context, role: str) -> None:
    """Put `champion` back on the version that held it before."""
    from kdas.tracking.promote import rollback as rollback_version

    name = registry_name(ctx, role)
    version = rollback_version(name)
    click.echo(f"{name}: champion is version {version} again")
