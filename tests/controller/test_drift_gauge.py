"""The operator's drift gauge follows the newest reading and goes when there is none, so
the drift alert (which compares it with the threshold) stops on a stale value."""

from __future__ import annotations

from prometheus_client import REGISTRY

from recsys_contracts.metric_names import OPERATOR_TRAINING_DRIFT
from recsys_operator.controller.metrics import record_drift


def drift(system: str, source: str = "ServedScores", test: str = "PSI") -> float | None:
    labels = {"system": system, "source": source, "test": test}
    return REGISTRY.get_sample_value(OPERATOR_TRAINING_DRIFT, labels)


def test_the_series_follows_the_reading_and_goes_with_it() -> None:
    record_drift("gauge.a", ("ServedScores", "PSI"), 0.4)
    record_drift("gauge.b", ("ServedScores", "KS"), 0.1)
    assert drift("gauge.a") == 0.4
    record_drift("gauge.a", ("ServedScores", "PSI"), None)  # too few scores now
    assert drift("gauge.a") is None
    assert drift("gauge.b", test="KS") == 0.1  # another system's series stays

    record_drift("gauge.b", ("ServedScores", "PSI"), 0.3)  # the test changed: one series
    assert (drift("gauge.b", test="KS"), drift("gauge.b")) == (None, 0.3)
    record_drift("gauge.b", None, None)  # triggers removed
    assert drift("gauge.b") is None
