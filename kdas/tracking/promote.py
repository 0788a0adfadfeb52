"""Promotion on the registry: the ``champion`` alias moved by the gate's decision
(kdas.tracking.promotion.decide) on like-for-like evidence, and moved back (rollback).
Registration, the version's tags and the checks of its files are kdas.tracking.registry's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kdas.tracking.promotion import CHALLENGER, CHAMPION, METRIC_TAG, PROMOTION_TAG, Decision, Evidence, Rule, decide, metric_tags
from kdas.tracking.registry import EVAL_DATA_TAG, RegistryError, check_files, data_key, tagged_metrics
from kdas.tracking.store import get_client, masked

PREVIOUS_CHAMPION_TAG = "previous_champion"
REEVAL_TAG = "eval."               # eval.<data key>/<set>/<metric>, eval.<data key>/<metric>: scores on other evaluation data
DECISION_TAG = PROMOTION_TAG + "decision"
# written first by a promote and replaced last: a promote stopped half-way (killed) leaves
# this, never a decision it did not finish, and the next promote of the version finishes it
PENDING = "pending"

#: evaluate a registered version (``models:/NAME/VERSION``) on the current test sets: returns
#: ({test set: {metric: value}, "mean": {metric: mean over the test sets}}, evaluation data id),
#: as metrics.json's "datasets" and "data"
Evaluator = Callable[[str], tuple[dict[str, dict[str, float]], str]]


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"no registered model '{name}' in {masked(client.tracking_uri)}") from None
        raise
    return {alias: str(version) for alias, version in model.aliases.items()}


def _record(tags: Mapping[str, str]) -> dict[str, str]:
    """A version's promotion record among its tags."""
    return {k: v for k, v in tags.items() if k.startswith(PROMOTION_TAG) or k == PREVIOUS_CHAMPION_TAG}


@contextlib.contextmanager
def _undone_on_error(client: MlflowClient, name: str, version: str) -> Iterator[None]:
    """If anything fails inside, put every alias of `name` and the promotion record of
    `version` back as they were: no evidence of a move that did not happen."""
    before = _aliases(client, name)
    record = _record(client.get_model_version(name, version).tags)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            now = _aliases(client, name)
            for alias in now.keys() - before.keys():
                client.delete_registered_model_alias(name, alias)
            for alias, number in before.items():
                if now.get(alias) != number:
                    client.set_registered_model_alias(name, alias, number)
            written = _record(client.get_model_version(name, version).tags)
            for key in written.keys() - record.keys():
                client.delete_model_version_tag(name, version, key)
            for key, value in record.items():
                if written.get(key) != value:
                    client.set_model_version_tag(name, version, key, value)
        raise


def _evidence(client: MlflowClient, name: str, version: str, data: str | None = None) -> Evidence:
    """A version's metrics on `data` (default: the data it was registered with); those it
    was registered with, naming their data, when it was not evaluated on `data`."""
    tags = client.get_model_version(name, version).tags
    own = tags.get(EVAL_DATA_TAG)
    if data is None or data == own:
        return Evidence.of(version, own, tagged_metrics(tags, METRIC_TAG))
    again = tagged_metrics(tags, f"{REEVAL_TAG}{data_key(data)}/")
    return Evidence.of(version, data, again) if again else Evidence.of(version, own, tagged_metrics(tags, METRIC_TAG))


def _evaluate_again(client: MlflowClient, name: str, version: str, evaluate: Evaluator) -> None:
    """The champion's metrics on the challenger's test sets, as ``eval.<data key>/...`` tags on its version."""
    datasets, data = evaluate(f"models:/{name}/{version}")
    means = datasets.get("mean", {})  # the evaluation's own means, as the registered metric.* are
    for key, value in metric_tags({**{d: m for d, m in datasets.items() if d != "mean"}, **means},
                                  prefix=f"{REEVAL_TAG}{data_key(data)}/").items():
        client.set_model_version_tag(name, version, key, value)
    client.set_model_version_tag(name, version, f"{REEVAL_TAG}{data_key(data)}.data", data)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def promote(name: str, rules: Mapping[str, Rule], evaluate: Evaluator | None = None, version: str | None = None) -> Decision:
    """Apply the gate's `rules` (kdas.tracking.rules.gate_rules) to `version` of `name`.

    A pipeline passes the version it registered: the ``challenger`` alias (the default, for
    a person at a terminal) is last-writer-wins, and another run may have moved it since.
    Callers serialise promotes of one model (the flow holds a lock the Prefect server keeps).

    Like for like: when the champion was scored on other data than the challenger, it is
    first evaluated on the challenger's test sets by `evaluate` (its metrics recorded on its
    version as ``eval.<data>/...`` tags); without `evaluate`, or if that fails, the rules that
    compare with the champion say so and nothing is promoted. The decision (each rule's
    verdict, both versions' evidence) is written as ``promotion.*`` tags on the challenger
    (Decision.tags): ``promotion.decision`` is ``pending`` first and the decision last,
    after ``champion`` moved (the replaced champion remembered as ``previous_champion``). A
    failure puts aliases and tags back as they were; a promote killed after the move leaves
    ``pending`` on the champion, and promoting that version again finishes its record. The
    champion never moves to a version whose files are incomplete (check_files).
    """
    client = get_client()
    aliases = _aliases(client, name)
    challenger = version or aliases.get(CHALLENGER)
    if challenger is None:
        raise RegistryError(f"'{name}' has no '{CHALLENGER}' version: register one first")
    try:
        record = _record(client.get_model_version(name, challenger).tags)
    except MlflowException:
        raise RegistryError(f"'{name}' has no version {challenger}") from None
    champion = aliases.get(CHAMPION)
    if champion == challenger and record.get(DECISION_TAG) == PENDING:
        client.set_model_version_tag(name, challenger, DECISION_TAG, "promoted")
        recorded = Decision.from_tags(True, record)
        return replace(recorded, reason=f"{recorded.reason} (the record of this promotion, stopped after the champion moved, "
                                        "is completed now)")
    ours = _evidence(client, name, challenger)
    theirs = _evidence(client, name, champion, ours.data) if champion else None
    if theirs is not None and champion != challenger and theirs.data != ours.data and evaluate is not None:
        with contextlib.suppress(Exception):  # cannot evaluate: the rules report the data mismatch
            _evaluate_again(client, name, champion, evaluate)
            theirs = _evidence(client, name, champion, ours.data)
    decided = decide(ours, theirs, rules)
    if champion == challenger:  # nothing to decide; keep the evidence of its promotion
        return decided
    if decided.promoted:
        check_files(name, challenger)
    with _undone_on_error(client, name, challenger):
        client.set_model_version_tag(name, challenger, DECISION_TAG, PENDING)
        for key, value in {**decided.tags(), PROMOTION_TAG + "time": _now()}.items():
            client.set_model_version_tag(name, challenger, key, value)
        if decided.promoted:
            client.set_model_version_tag(name, challenger, PREVIOUS_CHAMPION_TAG, str(champion))
            client.set_registered_model_alias(name, CHAMPION, challenger)
        client.set_model_version_tag(name, challenger, DECISION_TAG, "promoted" if decided.promoted else "rejected")
    return decided


def rollback(name: str) -> str:
    """Put ``champion`` back on the version it replaced; returns that version.

    The demoted version loses the ``challenger`` alias too (if it had it), so that a
    re-run of `promote` does not promote it again.
    """
    client = get_client()
    aliases = _aliases(client, name)
    current = aliases.get(CHAMPION)
    if current is None:
        raise RegistryError(f"'{name}' has no '{CHAMPION}': nothing to roll back")
    previous = client.get_model_version(name, current).tags.get(PREVIOUS_CHAMPION_TAG)
    if not previous or previous == "None":
        raise RegistryError(
            f"'{name}' champion version {current} replaced no earlier champion: nothing to roll back to"
        )
    try:
        client.get_model_version(name, previous)
    except MlflowException:
        raise RegistryError(f"'{name}' version {previous} (the previous champion) no longer exists") from None
    with _undone_on_error(client, name, current):
        note = f"{_now()}: champion back to version {previous}"
        client.set_model_version_tag(name, current, PROMOTION_TAG + "rolled_back", note)
        client.set_registered_model_alias(name, CHAMPION, previous)
        if aliases.get(CHALLENGER) == current:
            client.delete_registered_model_alias(name, CHALLENGER)
    return previous
