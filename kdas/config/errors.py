"""A pydantic ValidationError as the one line a user reads: the file, the dotted key, what it
must be."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from kdas.config.schema import Params


class ParamsError(ValueError):
    """params.yaml does not match the schema."""


def field_at(loc: tuple[Any, ...], root: type = Params) -> FieldInfo | None:
    """The field of `root` at `loc` (an error's location: section, key, ...), if it is one."""
    cls, info = root, None
    for part in loc:
        known = getattr(cls, "__pydantic_fields__", {})
        if not isinstance(part, str) or part not in known:
            return None
        info = known[part]
        cls = info.annotation
    return info


def bounds(info: FieldInfo) -> tuple[Any, Any]:
    """A field's [ge, le] range, as declared beside it."""
    return next(m.ge for m in info.metadata if hasattr(m, "ge")), next(m.le for m in info.metadata if hasattr(m, "le"))


def number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


TYPE_NAMES = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool", "list_type": "list",
               "dict_type": "a mapping", "dataclass_type": "a mapping", "dataclass_args_type": "a mapping"}


def dotted(loc: tuple[Any, ...], prefix: str = "") -> str:
    """An error's location as the key in params.yaml: train.lr, train.multiscale[0] (under
    `prefix`, the dotted key of the mapping validated)."""
    return (prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc if p not in ("[key]", "settings"))).lstrip(".")


def one_line(exc: ValidationError, where: str, root: type = Params, prefix: str = "") -> str:
    """The first of pydantic's errors as one line naming the file and the dotted key; unknown
    keys first, all those of one mapping together (pydantic lists them last, one by one)."""
    errors = exc.errors(include_url=False)
    unknown = [e for e in errors if e["type"] in ("unexpected_keyword_argument", "extra_forbidden", "invalid_key")]
    err = (unknown or errors)[0]
    loc, value, kind = err["loc"], err["input"], err["type"]
    key, section = dotted(loc, prefix), f"{where}: {dotted(loc[:-1], prefix)}: " if loc[:-1] or prefix else f"{where}: "
    if unknown:
        names = sorted((e["loc"][-1] for e in unknown if e["loc"][:-1] == loc[:-1]), key=str)
        mapping = field_at(loc[:-1], root)
        known = sorted(getattr(mapping.annotation if mapping else root, "__pydantic_fields__", {}))
        return f"{section}unknown key(s) {names}; known: {known}"
    if kind == "missing":
        return f"{section}missing key '{loc[-1]}'"
    info = field_at(loc, root)
    nullable = info is not None and type(None) in get_args(info.annotation)
    if kind in ("greater_than_equal", "less_than_equal") and info is not None:
        lo, hi = bounds(info)
        if nullable:  # the description says what null means
            bound = f"at least {number(lo)}" if value < lo else f"at most {number(hi)}"
            return f"{where}: {key} = {value!r} must be null ({info.description}) or {bound}"
        return f"{where}: {key} = {value!r} is out of range [{number(lo)}, {number(hi)}]"
    if kind == "literal_error" and info is not None:
        return f"{where}: {key} must be one of {', '.join(get_args(info.annotation))}, not {value!r}"
    if kind in TYPE_NAMES:
        expected = TYPE_NAMES[kind] + " or null" * nullable
        hint = "; e.g. write 1.0e-4, not '1e-4' (YAML reads that as text)" if kind == "float_type" and isinstance(value, str) else ""
        return f"{where}: {key + ': ' if key else ''}expected {expected}, got {value!r} ({type(value).__name__}){hint}"
    return f"{where}: {key}: {err['msg']}"
