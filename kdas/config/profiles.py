"""Writing params.yaml: named profiles and dotted keys, in place, comments kept."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdas.config.errors import ParamsError
from kdas.config.load import load_params
from kdas.config.schema import DEFAULT_PARAMS, Params


def profile_updates(params: Params, name: str) -> dict[str, Any]:
    """The dotted keys a named profile (params.yaml `profiles`) sets."""
    if name not in params.profiles:
        raise ParamsError(f"unknown profile {name!r}; params.yaml defines: {', '.join(params.profiles) or 'none'}")
    return dict(params.profiles[name])


def use_profile(name: str, path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Write a profile's keys into params.yaml (as `dvc exp run -S` would): the file then
    says what runs, and DVC sees every changed key. Returns the keys set."""
    updates = profile_updates(load_params(path), name)
    set_params(updates, path)
    return updates


def set_params(updates: dict[str, Any], path: str | Path = DEFAULT_PARAMS) -> bool:
    """Write dotted keys into params.yaml in place, keeping its comments (what `dvc exp run
    -S` does); returns whether anything changed. The result must still load."""
    from ruamel.yaml import YAML

    path = Path(path)
    yml = YAML()
    yml.preserve_quotes = True
    doc = yml.load(path.read_text())
    changed = False
    for dotted, value in updates.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            if not isinstance(node, Mapping):
                raise ParamsError(f"{path}: unknown key '{dotted}' ({'.'.join(parents[:depth])} is a value, not a section)")
            if key not in node:
                raise ParamsError(f"{path}: unknown key '{dotted}' ({'.'.join(parents[:depth]) or 'the file'} has no section '{key}')")
            node = node[key]
        if not isinstance(node, Mapping):
            raise ParamsError(f"{path}: unknown key '{dotted}' ({'.'.join(parents)} is a value, not a section)")
        if leaf not in node:
            raise ParamsError(f"{path}: unknown key '{dotted}'")
        if node[leaf] != value:
            node[leaf] = value
            changed = True
    if changed:  # checked before it replaces the file: a bad value leaves params.yaml as it was
        from kdas.io import atomic_path

        with atomic_path(path) as tmp:
            with tmp.open("w") as fh:
                yml.dump(doc, fh)
            try:
                load_params(tmp)
            except ParamsError as exc:
                raise ParamsError(str(exc).replace(str(tmp), str(path)) + " (not written)") from None
    return changed
