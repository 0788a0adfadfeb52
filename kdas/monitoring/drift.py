"""Do new frames still look like the training frames? Evidently's data-drift tests, one per
feature of kdas.monitoring.profile, and its dataset verdict: drift when at least
`drift_share` of the features drifted.

Evidently, not alibi-detect: it installs beside this project's pins (alibi-detect 0.13 would
take numpy back to 1.26 and bring transformers and numba), it picks a test per column by its
size and kind (K-S on a few hundred numbers, a Z-test on a constant one) and writes an HTML
report that works offline; benchmarks/results/monitoring.md measures how it separates these
datasets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import pandas as pd


@dataclass
class Verdict:
    drift: bool
    score: float  # the share of features that drifted
    features: dict[str, dict[str, Any]]  # per feature: method, score, threshold, drift
    frames: int
    reference_frames: int
    snapshot: Any  # Evidently's result (its HTML report)

    def to_json(self) -> dict[str, Any]:
        drifted = sorted(name for name, f in self.features.items() if f["drift"])
        return {"drift": self.drift, "score": self.score, "drifted": drifted, "frames": self.frames,
                "reference_frames": self.reference_frames, "features": self.features}


def _drifted(method: str, score: float, threshold: float) -> bool:
    """Evidently's rule: a p-value below its threshold, a distance at or above it."""
    return score < threshold if "p_value" in method else score >= threshold


def compare(reference: pd.DataFrame, current: pd.DataFrame, drift_share: float) -> Verdict:
    """Evidently's DataDriftPreset on the features both tables hold (a served model on
    onnxruntime logs no embedding, say)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    columns = [c for c in reference.columns if c in current.columns]
    if not columns:
        raise ValueError(f"the frames share no feature with the reference (it has {', '.join(reference.columns)})")
    definition = DataDefinition(numerical_columns=columns)
    with warnings.catch_warnings():  # scipy's "invalid value in divide" on a constant column: Evidently tests it another way
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = Report([DataDriftPreset(drift_share=drift_share)]).run(
            Dataset.from_pandas(current[columns], data_definition=definition),
            Dataset.from_pandas(reference[columns], data_definition=definition))
    features, share = {}, None
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if config["type"].endswith("DriftedColumnsCount"):
            share = float(metric["value"]["share"])
        elif config["type"].endswith("ValueDrift"):
            score = float(metric["value"])
            features[config["column"]] = {"method": config["method"], "score": score, "threshold": config["threshold"],
                                          "drift": _drifted(config["method"], score, config["threshold"])}
    if share is None or set(features) != set(columns):
        raise RuntimeError(f"Evidently {_version()} answered in an unknown shape; kdas reads 0.7's")
    return Verdict(drift=share >= drift_share, score=share, features=features, frames=len(current),
                   reference_frames=len(reference), snapshot=snapshot)


def _version() -> str:
    from importlib.metadata import version

    return version("evidently")
