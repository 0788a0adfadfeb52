"""params.yaml as YAML: the safe loader, a key given twice refused, aliases bounded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kdas.config.errors import ParamsError

# params.yaml holds ~200 values; YAML aliases can make a few lines stand for billions (an
# "alias bomb": kdas's loader shares them, DVC's expands them and runs out of memory)
MAX_YAML_VALUES = 10_000


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (YAML forbids it; PyYAML
    would keep the last one silently, and DVC refuses the file)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} given twice (lines {seen[key]} and {line})")
                seen[key] = line
        return super().construct_mapping(node, deep)


def _expanded_values(raw: Any) -> int:
    """How many values `raw` holds with its aliases expanded, counted up to MAX_YAML_VALUES + 1."""
    count, todo = 0, [raw]
    while todo and count <= MAX_YAML_VALUES:
        value = todo.pop()
        count += 1
        if isinstance(value, dict):
            todo += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            todo += value
    return count


def read_yaml(path: Path) -> Any:
    """params.yaml's content, or a ParamsError of one line naming the file: a file that is
    missing, not YAML text, a key twice in a mapping, nested too deep, an alias bomb."""
    if not path.exists():
        raise ParamsError(f"{path}: not found (run kdas from the project root, or pass --params)")
    try:
        with path.open() as fh:
            raw = yaml.load(fh, Loader=_StrictLoader) or {}  # noqa: S506 (a safe loader)
    except _DuplicateKey as exc:
        raise ParamsError(f"{path}: {exc}; a key may appear once per mapping") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ParamsError(f"{path}: not a text file (not UTF-8); params.yaml is YAML text") from None
    except RecursionError:
        raise ParamsError(f"{path}: nested too deeply to be a params file") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits (Python's int-from-string limit)
        raise ParamsError(f"{path}: not a params file ({str(exc).splitlines()[0][:200]})") from None
    if _expanded_values(raw) > MAX_YAML_VALUES:
        raise ParamsError(f"{path}: its YAML aliases expand to more than {MAX_YAML_VALUES} values (an alias bomb?); write the "
                          "values out instead")
    return raw
