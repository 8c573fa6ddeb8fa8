"""What the triggers decide from readings: no decision on too little data, the CTR-drop
arithmetic, and when a trigger that fired may start a run."""

from __future__ import annotations

import pytest

from recsys_operator.api.training import DriftTrigger, PerformanceTrigger, TriggersSpec
from recsys_operator.retraining.trigger_metrics import Ctr
from recsys_operator.retraining.triggers import (
    MIN_IMPRESSIONS,
    MIN_OBSERVATIONS,
    cooldown_s,
    hold_reason,
    read_drift,
    read_performance,
)

NOW = "2026-01-01T00:00:00Z"


def test_too_few_impressions_decide_nothing_however_low_the_ctr() -> None:
    spec = PerformanceTrigger(min_ctr=0.05)
    reading, firings = read_performance(spec, Ctr(0, MIN_IMPRESSIONS - 1), None, NOW)
    assert firings == [] and reading.ctr is None
    assert f"{MIN_IMPRESSIONS} needed" in reading.message
    _, firings = read_performance(spec, Ctr(0, MIN_IMPRESSIONS), None, NOW)
    assert [f.check for f in firings] == ["minCtr"]


def test_a_ctr_drop_is_measured_against_the_window_before() -> None:
    spec = PerformanceTrigger(max_ctr_drop=0.2)
    # 0.04 against 0.05: down 20%, not beyond 20%.
    reading, firings = read_performance(spec, Ctr(40, 1000), Ctr(50, 1000), NOW)
    assert (reading.ctr, reading.previous_ctr, firings) == (0.04, 0.05, [])
    _, firings = read_performance(spec, Ctr(39, 1000), Ctr(50, 1000), NOW)
    assert [(f.check, f.value) for f in firings] == [("maxCtrDrop", pytest.approx(0.22))]
    # No comparable window before (a new system): no drop can be measured.
    reading, firings = read_performance(spec, Ctr(1, 1000), Ctr(5, 100), NOW)
    assert firings == [] and "too few impressions" in reading.message


def test_too_few_scores_decide_nothing() -> None:
    spec = DriftTrigger(threshold=0.2)
    small = {"0.5": 0, "+Inf": MIN_OBSERVATIONS - 1}
    large = {"0.5": 1000, "+Inf": 1000}
    reading, firings = read_drift(spec, small, large, NOW)
    assert firings == [] and reading.value is None and "needed" in reading.message
    reading, firings = read_drift(spec, {}, large, NOW)  # the stable served nothing
    assert firings == [] and "observed nothing" in reading.message


def test_a_fired_trigger_waits_for_an_active_run_the_cooldown_and_suspend() -> None:
    def hold(
        active: tuple[str, ...] = (), last_start: float = 1000.0, suspended: bool = False
    ) -> str | None:
        return hold_reason(
            now_s=10_000.0,
            active_jobs=list(active),
            last_start_s=last_start,
            cooldown=3600.0,
            suspended=suspended,
        )

    assert hold() is None
    assert "still active" in str(hold(active=("j",)))
    assert "cooldown" in str(hold(last_start=9000.0))
    assert "suspend" in str(hold(suspended=True))


def test_the_cooldown_defaults_to_the_longest_window() -> None:
    both = {"performance": {"minCtr": 0.1, "window": "6h"}, "drift": {"window": "24h"}}
    assert cooldown_s(TriggersSpec.model_validate(both)) == 24 * 3600
    assert cooldown_s(TriggersSpec.model_validate(both | {"cooldown": "30m"})) == 1800
