"""The promotion decision, a pure function of evidence: no registry, no MLflow. kdas.tracking.promote
gathers the evidence (every metric per test set of challenger and champion, and the data each
was measured on) and applies the decision to the aliases.

The gate (``register.gate`` in params.yaml) is a set of named rules (kdas.tracking.rules): the
challenger is promoted iff it passes them all, and the decision names each rule's verdict.
A number from other data never decides: a rule comparing with the champion refuses one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

from kdas.provenance import finite_metrics, safe_key

METRIC_TAG = "metric."  # version tags holding the evaluation metrics
PROMOTION_TAG = "promotion."  # the challenger's record of a decision on it
# the registry's aliases: what serves (models:/NAME@champion) and what waits for the gate
CHAMPION = "champion"
CHALLENGER = "challenger"

Judgement = tuple[bool, str]  # (passed, why)


@dataclass(frozen=True)
class Evidence:
    """One version's evaluation: every metric per test set, each metric's mean over the test
    sets, and the identity of the data they were measured on."""

    version: str
    data: str | None  # e.g. "cvc-colondb,kvasir-seg@3f2a..." (kdas.evaluation.evaluate.evaluation_data_id)
    per_set: Mapping[str, Mapping[str, float]]  # {test set: {metric: value}}
    mean: Mapping[str, float]  # {metric: its mean over the test sets}

    @classmethod
    def of(cls, version: str, data: str | None, metrics: Mapping[str, float]) -> Evidence:
        """From flat metrics as the version's tags hold them: ``{"<set>/<metric>": v, "<metric>": mean}``."""
        per_set: dict[str, dict[str, float]] = {}
        mean: dict[str, float] = {}
        for key, value in metrics.items():
            if "/" in key:
                dataset, metric = key.rsplit("/", 1)
                per_set.setdefault(dataset, {})[metric] = value
            else:
                mean[key] = value
        return cls(version, data, per_set, mean)


class Rule(Protocol):
    """A rule of the gate (kdas.tracking.rules): whether `challenger` passes, given the champion."""

    kind: str

    def judge(self, challenger: Evidence, champion: Evidence | None) -> Judgement: ...


@dataclass(frozen=True)
class Verdict:
    name: str  # the rule's key in register.gate
    rule: str  # its kind
    passed: bool
    reason: str


# the decision's fields recorded as text (the others as JSON); "None" for none, as a tag cannot be empty
_TEXT = ("challenger", "champion_before", "reason")


@dataclass(frozen=True)
class Decision:
    promoted: bool
    challenger: str | None  # version
    champion_before: str | None
    reason: str
    verdicts: tuple[Verdict, ...] = ()
    challenger_evidence: Evidence | None = None
    champion_evidence: Evidence | None = None

    @property
    def challenger_data(self) -> str | None:
        return self.challenger_evidence.data if self.challenger_evidence else None

    @property
    def champion_data(self) -> str | None:
        return self.champion_evidence.data if self.champion_evidence else None

    def tags(self) -> dict[str, str]:
        """The decision as ``promotion.<field>`` tags, every field but `promoted` (the
        ``promotion.decision`` tag that kdas.tracking.promote writes last); from_tags reads them back."""
        plain = asdict(self)
        return {PROMOTION_TAG + f.name: str(plain[f.name]) if f.name in _TEXT else json.dumps(plain[f.name])
                for f in fields(self) if f.name != "promoted"}

    @classmethod
    def from_tags(cls, promoted: bool, tags: Mapping[str, str]) -> Decision:
        """The decision that `tags` record (a record written by an older kdas: without its verdicts and evidence)."""
        def value(name: str) -> Any:
            raw = tags.get(PROMOTION_TAG + name)
            if name in _TEXT:
                return None if raw in (None, "None") else raw
            return json.loads(raw) if raw else None

        evidence = {name: Evidence(**raw) if (raw := value(name)) else None for name in ("challenger_evidence", "champion_evidence")}
        return cls(promoted, value("challenger"), value("champion_before"), value("reason") or "",
                   tuple(Verdict(**v) for v in value("verdicts") or ()), **evidence)


def decide(challenger: Evidence, champion: Evidence | None, rules: Mapping[str, Rule]) -> Decision:
    """Whether `challenger` replaces `champion` (None: there is none): iff it passes every rule."""
    def decision(promoted: bool, reason: str, verdicts: tuple[Verdict, ...] = ()) -> Decision:
        return Decision(promoted, challenger.version, champion.version if champion else None, reason, verdicts, challenger, champion)

    if champion is not None and champion.version == challenger.version:
        return decision(False, f"version {challenger.version} already is the champion")
    verdicts = tuple(Verdict(name, rule.kind, *rule.judge(challenger, champion)) for name, rule in rules.items())
    failed = [v for v in verdicts if not v.passed]
    shown = failed or verdicts
    reason = "; ".join(f"{v.name} {'passed' if v.passed else 'failed'}: {v.reason}" for v in shown) or "the gate has no rules"
    return decision(not failed, reason, verdicts)


def metric_tags(metrics: Mapping[str, Any], prefix: str = METRIC_TAG) -> dict[str, str]:
    """Version tags for evaluation metrics.

    `metrics` holds per-test-set values as ``{"<set>/<metric>": v}`` (or nested
    ``{set: {metric: v}}``). Each becomes tag ``<prefix><set>/<metric>``, and each metric's
    mean over the sets becomes ``<prefix><metric>`` unless the caller gave that key itself.
    Non-finite values are dropped with a warning.
    """
    values = finite_metrics(metrics)
    per_metric: dict[str, list[float]] = {}
    for key, number in values.items():
        if "/" in key:
            per_metric.setdefault(key.rsplit("/", 1)[1], []).append(number)
    for metric, numbers in per_metric.items():
        values.setdefault(metric, sum(numbers) / len(numbers))
    return {safe_key(prefix + key): repr(number) for key, number in values.items()}
