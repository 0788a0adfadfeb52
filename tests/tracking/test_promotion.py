"""The promotion decision as a pure function: no registry, no server."""

from __future__ import annotations

import pytest

from kdas.config import GateParams
from kdas.tracking.promotion import Evidence, decide, metric_tags

GATE = GateParams(metric="meanDic", margin=0.01, floor=0.2)
A, B = "kvasir-seg@aaaaaaaaaaaa", "kvasir-seg@bbbbbbbbbbbb"


@pytest.mark.parametrize(
    ("challenger", "champion", "promoted", "reason"),
    [
        (Evidence("2", 0.5, A), None, True, "no champion yet"),
        (Evidence("2", 0.1, A), None, False, "below the floor 0.2"),
        (Evidence("2", None, A), Evidence("1", 0.5, A), False, "no numeric meanDic"),
        (Evidence("1", 0.5, A), Evidence("1", 0.5, A), False, "already is the champion"),
        (Evidence("2", 0.49, A), Evidence("1", 0.5, A), True, ">= champion 0.5000 - margin 0.01"),   # within the margin
        (Evidence("2", 0.4899, A), Evidence("1", 0.5, A), False, "< champion 0.5000 - margin 0.01"),  # just outside it
        (Evidence("2", 0.9, B), Evidence("1", 0.5, A), False, "scored on other data"),  # never on a number from other data
        (Evidence("2", 0.9, B), Evidence("1", None, B), False, "champion version 1 has no numeric"),
    ],
)
def test_the_gate(challenger, champion, promoted, reason):
    decision = decide(challenger, champion, GATE)
    assert decision.promoted is promoted and reason in decision.reason
    assert decision.challenger_data == challenger.data and decision.champion_data == (champion.data if champion else None)


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
