"""The promotion decision, a pure function of evidence: no registry, no MLflow. kdas.tracking
gathers the evidence (scores and evaluation data of challenger and champion) and applies
the decision to the aliases.

The gate (``register.gate`` in params.yaml): the challenger is promoted iff its score is
at least the floor and, when there is a champion, at least the champion's score minus the
margin, both scores measured on the same evaluation data (the same test sets at the same
content). A number from other data never decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kdas.config import GateParams
from kdas.provenance import finite_metrics, safe_key

METRIC_TAG = "metric."  # version tags holding the evaluation metrics
# the registry's aliases: what serves (models:/NAME@champion) and what waits for the gate
CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class Evidence:
    """One version's evaluation: its gate score and the identity of the data it was scored on."""

    version: str
    score: float | None
    data: str | None  # e.g. "cvc-colondb,kvasir-seg@3f2a..." (kdas.evaluation.evaluate.evaluation_data_id)


@dataclass(frozen=True)
class Decision:
    promoted: bool
    challenger: str | None  # version
    champion_before: str | None
    challenger_score: float | None
    champion_score: float | None
    reason: str
    challenger_data: str | None = None
    champion_data: str | None = None


def decide(challenger: Evidence, champion: Evidence | None, gate: GateParams) -> Decision:
    """Whether `challenger` replaces `champion` (None: there is none)."""
    score = challenger.score

    def decision(promoted: bool, reason: str) -> Decision:
        return Decision(promoted, challenger.version, champion.version if champion else None, score,
                        champion.score if champion else None, reason, challenger.data, champion.data if champion else None)

    metric = gate.metric
    if champion is not None and champion.version == challenger.version:
        return decision(False, f"version {challenger.version} already is the champion")
    if score is None:
        return decision(False, f"challenger version {challenger.version} has no numeric {metric}: cannot score it")
    if score < gate.floor:
        return decision(False, f"challenger {metric} {score:.4f} is below the floor {gate.floor}")
    if champion is None:
        return decision(True, f"no champion yet; challenger {metric} {score:.4f} >= floor {gate.floor}")
    if champion.data != challenger.data:
        return decision(False, f"champion version {champion.version} was scored on other data ({champion.data}) than the "
                               f"challenger ({challenger.data}): evaluate it on the challenger's test sets first")
    if champion.score is None:
        return decision(False, f"champion version {champion.version} has no numeric {metric}: cannot compare")
    if score < champion.score - gate.margin:
        return decision(False, f"challenger {metric} {score:.4f} < champion {champion.score:.4f} - margin {gate.margin} "
                               f"(both on {challenger.data})")
    return decision(True, f"challenger {metric} {score:.4f} >= champion {champion.score:.4f} - margin {gate.margin} "
                          f"(both on {challenger.data})")


def metric_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Version tags for evaluation metrics.

    `metrics` holds per-test-set values as ``{"<set>/<metric>": v}`` (or nested
    ``{set: {metric: v}}``). Each becomes tag ``metric.<set>/<metric>``, and each metric's
    mean over the sets becomes ``metric.<metric>`` (the promotion gate's score) unless the
    caller gave that key itself. Non-finite values are dropped with a warning.
    """
    values = finite_metrics(metrics)
    per_metric: dict[str, list[float]] = {}
    for key, number in values.items():
        if "/" in key:
            per_metric.setdefault(key.rsplit("/", 1)[1], []).append(number)
    for metric, numbers in per_metric.items():
        values.setdefault(metric, sum(numbers) / len(numbers))
    return {safe_key(METRIC_TAG + key): repr(number) for key, number in values.items()}
