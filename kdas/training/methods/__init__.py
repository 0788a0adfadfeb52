"""The distillation methods, one module each: `none` (the ground truth alone), `kd` (plain
pixel distillation, the baseline), `sgm` (the Symmetrical Guiding Module), `kdas` (attention
supervision + SGM). A method's module holds its `Params` (its section of params.yaml's
`distill`, e.g. `distill.kd`), its `Task` (kdas.training.task) and its teacher terms.

Adding a method is one module here, its section in params.yaml and its test: the names are
this folder's modules (listed without importing them, so the CLI's choices and the params
schema stay free of torch), and a module is imported only when its task is built.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

from kdas.config import DEFAULT_PARAMS, DistillParams, ParamsError, parse_section

NONE = "none"


def names() -> tuple[str, ...]:
    """Every method, `none` first."""
    return tuple(sorted((m.name for m in pkgutil.iter_modules(__path__)), key=lambda n: (n != NONE, n)))


def module(name: str) -> ModuleType:
    if name not in names():
        raise ParamsError(f"unknown distill.method {name!r}; expected one of {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}")


def method_params(distill: DistillParams, where: str = str(DEFAULT_PARAMS)) -> Any:
    """The typed settings of `distill.method`: its section `distill.<method>` read by its
    module's Params (a method without settings needs no section)."""
    if stray := sorted(set(distill.settings) - set(names())):
        raise ParamsError(f"{where}: distill.{stray[0]}: no method of that name (methods: {', '.join(names())}); "
                          "each key of distill besides method and seed is one method's settings")
    return parse_section(module(distill.method).Params, distill.settings.get(distill.method, {}), f"distill.{distill.method}", where)


def create_task(distill: DistillParams | None, teacher, **options):
    """The task of `distill.method` (`distill` None: the ground truth alone, as method none).
    `teacher` loads the teacher's model file (None: there is none); only a method that
    distils calls it, and one that distils without it is a ValueError. `options`: the
    task's (weighted_bce, precision, compile)."""
    if distill is None:
        return module(NONE).Task.from_params(module(NONE).Params(), teacher, **options)
    return module(distill.method).Task.from_params(method_params(distill), teacher, **options)
