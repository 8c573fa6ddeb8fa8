"""Which windows a cumulative look reads, from the step starts kept in status."""

from __future__ import annotations

from datetime import datetime

from recsys_operator.api.status import CanaryStatus
from recsys_operator.rollout.prometheus_source import earlier_windows


def unix(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_each_earlier_step_is_read_from_its_start_to_the_next_one() -> None:
    starts = ["2026-01-01T12:00:00Z", "2026-01-01T12:05:00Z", "2026-01-01T12:17:30Z"]
    canary = CanaryStatus(version="2", weight=50, step=2, step_starts=starts)
    assert earlier_windows(canary) == [
        (300.0, unix("2026-01-01T12:05:00Z")),
        (750.0, unix("2026-01-01T12:17:30Z")),  # held twice at step 1: three intervals
    ]
    assert earlier_windows(canary.model_copy(update={"step": 0, "step_starts": starts[:1]})) == []


def test_a_rollout_without_its_history_reads_only_its_own_step() -> None:
    # Started by an operator that did not keep stepStarts: no earlier windows, so the
    # look is judged alone, at the union-bound level.
    assert earlier_windows(CanaryStatus(version="2", weight=25, step=1)) is None
    partial = CanaryStatus(version="2", weight=50, step=2, step_starts=["2026-01-01T12:00:00Z"])
    assert earlier_windows(partial) is None
