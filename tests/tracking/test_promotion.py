"""The promotion decision as a pure function: no registry, no server. The project's gate
(params.yaml) decides as the gate of metric, margin and floor did; each rule on its own."""

from __future__ import annotations

import pytest

from helpers import PARAMS
from kdas.tracking.promotion import Decision, Evidence, decide, metric_tags
from kdas.tracking.rules import Ceiling, Floor, Margin, gate_rules

A, B = "kvasir-seg@aaaaaaaaaaaa", "kvasir-seg@bbbbbbbbbbbb"


def scored(version: str, data: str, mean: float | None = None, **per_set: dict[str, float]) -> Evidence:
    """A version's evidence: its mean meanDic (None: none) and any metrics per test set."""
    return Evidence(version, data, per_set, {} if mean is None else {"meanDic": mean})


@pytest.mark.parametrize(
    ("challenger", "champion", "promoted", "reason"),
    [  # the cases of the gate before its rules (metric meanDic, margin 0.01, floor 0.2): the same decisions
        (scored("2", A, 0.5), None, True, "no champion yet"),
        (scored("2", A, 0.1), None, False, "below the floor 0.2"),
        (scored("2", A), scored("1", A, 0.5), False, "no numeric meanDic"),
        (scored("1", A, 0.5), scored("1", A, 0.5), False, "already is the champion"),
        (scored("2", A, 0.49), scored("1", A, 0.5), True, ">= champion 0.5000 - margin 0.01"),   # within the margin
        (scored("2", A, 0.4899), scored("1", A, 0.5), False, "< champion 0.5000 - margin 0.01"),  # just outside it
        (scored("2", B, 0.9), scored("1", A, 0.5), False, "scored on other data"),  # never on a number from other data
        (scored("2", B, 0.9), scored("1", B), False, "champion version 1 has no numeric"),
        (scored("2", B, 0.15), scored("1", A, 0.5), False, "below the floor 0.2"),  # the floor first, as before
    ],
)
def test_the_projects_gate_decides_as_before(challenger, champion, promoted, reason):
    rules = gate_rules(PARAMS.register.gate)
    assert [(name, rule.kind) for name, rule in rules.items()] == [("floor", "floor"), ("margin", "margin")]
    decision = decide(challenger, champion, rules)
    assert decision.promoted is promoted and reason in decision.reason
    assert decision.challenger_data == challenger.data and decision.champion_data == (champion.data if champion else None)
    assert decision.challenger_evidence == challenger and decision.champion_evidence == champion


def test_each_rules_verdict_is_named_in_the_decision():
    rules = {"mean": Floor(metric="meanDic", min=0.2, each_set=False), "mae": Ceiling(metric="mae", max=0.05, each_set=False)}
    decision = decide(Evidence("2", A, {}, {"meanDic": 0.5, "mae": 0.08}), None, rules)
    assert not decision.promoted and decision.reason == "mae failed: challenger mae 0.0800 is above the ceiling 0.05"
    assert [(v.name, v.rule, v.passed) for v in decision.verdicts] == [("mean", "floor", True), ("mae", "ceiling", False)]
    assert decide(Evidence("2", A, {}, {"meanDic": 0.5}), None, {}).promoted  # no rules: nothing to pass


def test_the_decision_is_its_tags_and_back():
    champion = Evidence("1", A, {"kvasir": {"meanDic": 0.8}}, {"meanDic": 0.8})
    decision = decide(Evidence("2", A, {"kvasir": {"meanDic": 0.9}}, {"meanDic": 0.9}), champion, gate_rules(PARAMS.register.gate))
    tags = decision.tags()
    assert tags["promotion.champion_before"] == "1" and tags["promotion.reason"] == decision.reason
    assert all(key.startswith("promotion.") and isinstance(value, str) for key, value in tags.items())
    assert Decision.from_tags(True, tags) == decision
    assert Decision.from_tags(True, {"promotion.reason": "older"}) == Decision(True, None, None, "older")  # an older kdas's record


def test_floor_on_every_test_set():
    """No test set worse than X: the mean may pass while one set does not."""
    rule = Floor(metric="meanDic", min=0.5, each_set=True)
    uneven = Evidence("2", A, {"kvasir": {"meanDic": 0.9}, "cvc": {"meanDic": 0.4}}, {"meanDic": 0.65})
    assert rule.judge(uneven, None) == (False, "challenger meanDic cvc 0.4000 is below the floor 0.5")
    assert Floor(metric="meanDic", min=0.5, each_set=False).judge(uneven, None)[0]
    assert rule.judge(Evidence("2", A, {"kvasir": {"meanDic": 0.5}}, {}), None) == (True, "challenger meanDic kvasir 0.5000 >= floor 0.5")
    unscored = "challenger version 2 has no numeric meanDic per test set: cannot score it"
    assert rule.judge(Evidence("2", A, {}, {"meanDic": 0.9}), None) == (False, unscored)


def test_ceiling_bounds_an_error_such_as_mae():
    rule = Ceiling(metric="mae", max=0.05, each_set=False)
    assert rule.judge(Evidence("2", A, {}, {"mae": 0.05}), None) == (True, "challenger mae 0.0500 <= ceiling 0.05")
    assert rule.judge(Evidence("2", A, {}, {"mae": 0.051}), None)[0] is False
    assert Ceiling(metric="mae", max=0.05, each_set=True).judge(Evidence("2", A, {"cvc": {"mae": 0.07}}, {"mae": 0.04}), None) == (
        False, "challenger mae cvc 0.0700 is above the ceiling 0.05")


def test_margin_set_by_set_on_the_same_data():
    rule = Margin(metric="meanDic", margin=0.01, each_set=True)
    champion = Evidence("1", A, {"kvasir": {"meanDic": 0.8}, "cvc": {"meanDic": 0.6}}, {"meanDic": 0.7})
    better_mean = Evidence("2", A, {"kvasir": {"meanDic": 0.95}, "cvc": {"meanDic": 0.55}}, {"meanDic": 0.75})
    assert Margin(metric="meanDic", margin=0.01, each_set=False).judge(better_mean, champion)[0]
    passed, reason = rule.judge(better_mean, champion)
    assert not passed and reason == f"challenger meanDic cvc 0.5500 < champion 0.6000 - margin 0.01 (both on {A})"
    close = Evidence("2", A, {"kvasir": {"meanDic": 0.795}, "cvc": {"meanDic": 0.6}}, {"meanDic": 0.6975})
    assert rule.judge(close, champion)[0]
    assert rule.judge(close, None) == (True, "no champion yet")
    assert "scored on other data" in rule.judge(close, Evidence("1", B, champion.per_set, champion.mean))[1]
    means_only = Evidence("1", A, {}, {"meanDic": 0.7})  # re-evaluated by an older kdas: no per-set metrics
    assert rule.judge(close, means_only) == (False, "champion version 1 has no numeric meanDic per test set: cannot compare")


def test_metric_tags_average_the_test_sets():
    tags = metric_tags({"kvasir": {"meanDic": 0.9, "mae": 0.02}, "colondb": {"meanDic": 0.7, "mae": 0.04}})
    assert float(tags["metric.meanDic"]) == pytest.approx(0.8) and float(tags["metric.mae"]) == pytest.approx(0.03)
    assert float(tags["metric.kvasir/meanDic"]) == 0.9
    with pytest.warns(UserWarning, match="not a finite number"):
        assert "metric.x/meanDic" not in metric_tags({"x": {"meanDic": float("nan")}})


def test_metric_tags_average_over_test_sets() -> None:
    tags = metric_tags({"kvasir": {"meanDic": 0.9, "MAE": 0.03}, "cvc/meanDic": 0.7})
    assert float(tags["metric.meanDic"]) == pytest.approx(0.8)
    assert float(tags["metric.kvasir/MAE"]) == 0.03
    assert float(tags["metric.MAE"]) == 0.03
    # an explicit aggregate wins over the computed mean
    assert float(metric_tags({"a/meanDic": 0.2, "meanDic": 0.9})["metric.meanDic"]) == 0.9
    with pytest.warns(UserWarning):
        assert metric_tags({"a/meanDic": float("nan")}) == {}
    assert metric_tags({"a": {"mae": 0.1}}, prefix="eval.k/") == {"eval.k/a/mae": "0.1", "eval.k/mae": "0.1"}
