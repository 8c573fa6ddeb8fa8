"""The operator's own metrics, served on /metrics by `recsys operator run`."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from recsys_contracts.metric_names import (
    OPERATOR_RECONCILE_DURATION,
    OPERATOR_RECONCILE_ERRORS,
    OPERATOR_RECONCILES,
    OPERATOR_ROLLOUT_DECISIONS,
    OPERATOR_TRAINING_DRIFT,
)

RECONCILES = Counter(
    OPERATOR_RECONCILES.removesuffix("_total"),
    "Reconciles of RecommenderSystems, by trigger.",
    ["trigger"],
)
RECONCILE_ERRORS = Counter(
    OPERATOR_RECONCILE_ERRORS.removesuffix("_total"), "Reconciles that raised an unexpected error."
)
RECONCILE_DURATION = Histogram(
    OPERATOR_RECONCILE_DURATION,
    "Seconds one reconcile took.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ROLLOUT_DECISIONS = Counter(
    OPERATOR_ROLLOUT_DECISIONS.removesuffix("_total"),
    "Rollout decisions (started, advanced, promoted, rolled back, ...).",
    ["reason"],
)
TRAINING_DRIFT = Gauge(
    OPERATOR_TRAINING_DRIFT,
    "The drift statistic (PSI or KS) spec.training.triggers.drift last measured, per system.",
    ["system", "source", "test"],
)

_DRIFT_SERIES: dict[str, tuple[str, str]] = {}
"""The labels (source, test) of each system's drift series, to remove it by system."""


def record_drift(system: str, series: tuple[str, str] | None, value: float | None) -> None:
    """Set the system's drift series to the newest reading, or remove it when there is no
    reading (triggers removed, too few scores, Prometheus unreachable): a stale high value
    would keep the drift alert firing."""
    old = _DRIFT_SERIES.pop(system, None)
    if old is not None and (value is None or old != series):
        TRAINING_DRIFT.remove(system, *old)
    if series is not None and value is not None:
        TRAINING_DRIFT.labels(system, *series).set(value)
        _DRIFT_SERIES[system] = series
