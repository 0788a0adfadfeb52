"""The gate's rules, pure (no MLflow): ``register.gate`` in params.yaml names rules, each of a kind
(its `rule` key) that is one class here: its fields are the kind's settings (typed when the
gate is read, gate_rules), its `judge` says from the evidence alone whether a challenger
passes, and why. A new kind: a class here listed in KINDS, a params entry, a test.

A rule that compares with the champion passes when there is none, and never compares numbers
measured on other data (kdas.tracking.promote first evaluates such a champion again).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from pydantic.dataclasses import dataclass

from kdas.config import DEFAULT_PARAMS, SCHEMA, Bool, Fraction, GateParams, ParamsError, Str, parse_section
from kdas.tracking.promotion import Evidence, Judgement, Rule


def _scores(evidence: Evidence, metric: str, each_set: bool) -> dict[str, float]:
    """What a rule reads of `evidence`: {"<test set> ": value} set by set, else {"": the mean
    over the test sets} (the key prefixes the value where it is shown); {} where there is no number."""
    if each_set:
        return {f"{name} ": values[metric] for name, values in evidence.per_set.items() if metric in values}
    return {"": evidence.mean[metric]} if metric in evidence.mean else {}


def _unscored(evidence: Evidence, metric: str, each_set: bool) -> str:
    return f"version {evidence.version} has no numeric {metric}{' per test set' if each_set else ''}"


def _bounded(challenger: Evidence, metric: str, each_set: bool, within: Callable[[float], bool], outside: str,
             inside: str) -> Judgement:
    """A bound on the challenger's own numbers: every one `within` it, or those `outside` named."""
    scores = _scores(challenger, metric, each_set)
    if not scores:
        return False, f"challenger {_unscored(challenger, metric, each_set)}: cannot score it"
    failed = [f"{at}{value:.4f}" for at, value in scores.items() if not within(value)]
    if failed:
        return False, f"challenger {metric} {', '.join(failed)} {outside}"
    return True, f"challenger {metric} {', '.join(f'{at}{value:.4f}' for at, value in scores.items())} {inside}"


@dataclass(frozen=True, config=SCHEMA)
class Floor:
    """The challenger's `metric` is at least `min`."""

    kind: ClassVar[str] = "floor"
    metric: Str
    min: Fraction
    each_set: Bool

    def judge(self, challenger: Evidence, champion: Evidence | None) -> Judgement:
        return _bounded(challenger, self.metric, self.each_set, lambda v: v >= self.min, f"is below the floor {self.min}",
                        f">= floor {self.min}")


@dataclass(frozen=True, config=SCHEMA)
class Ceiling:
    """The challenger's `metric` is at most `max` (for an error such as mae)."""

    kind: ClassVar[str] = "ceiling"
    metric: Str
    max: Fraction
    each_set: Bool

    def judge(self, challenger: Evidence, champion: Evidence | None) -> Judgement:
        return _bounded(challenger, self.metric, self.each_set, lambda v: v <= self.max, f"is above the ceiling {self.max}",
                        f"<= ceiling {self.max}")


@dataclass(frozen=True, config=SCHEMA)
class Margin:
    """The challenger's `metric` (higher is better) is at least the champion's minus `margin`,
    both measured on the same data."""

    kind: ClassVar[str] = "margin"
    metric: Str
    margin: Fraction
    each_set: Bool

    def judge(self, challenger: Evidence, champion: Evidence | None) -> Judgement:
        if champion is None:
            return True, "no champion yet"
        if champion.data != challenger.data:
            return False, (f"champion version {champion.version} was scored on other data ({champion.data}) than the "
                           f"challenger ({challenger.data}): evaluate it on the challenger's test sets first")
        ours, theirs = (_scores(e, self.metric, self.each_set) for e in (challenger, champion))
        if not ours:
            return False, f"challenger {_unscored(challenger, self.metric, self.each_set)}: cannot score it"
        if not theirs or ours.keys() - theirs.keys():
            return False, f"champion {_unscored(champion, self.metric, self.each_set)}: cannot compare"
        worse = [at for at in ours if ours[at] < theirs[at] - self.margin]
        compared = ", ".join(f"{at}{ours[at]:.4f} {'<' if at in worse else '>='} champion {theirs[at]:.4f} - margin {self.margin}"
                             for at in (worse or ours))
        return not worse, f"challenger {self.metric} {compared} (both on {challenger.data})"


KINDS: dict[str, type] = {kind.kind: kind for kind in (Floor, Ceiling, Margin)}


def gate_rules(gate: GateParams, where: str = str(DEFAULT_PARAMS)) -> dict[str, Rule]:
    """``register.gate``'s rules by name, each typed by its kind; a ParamsError of one line
    naming the rule's key otherwise (read before anything is trained or promoted)."""
    rules = {}
    for name, spec in gate.items():
        if spec.rule not in KINDS:
            raise ParamsError(f"{where}: register.gate.{name}.rule must be one of {', '.join(KINDS)}, not {spec.rule!r}")
        rules[name] = parse_section(KINDS[spec.rule], spec.settings, f"register.gate.{name}", where)
    return rules
