"""status.trainingTriggers: what the performance and drift triggers measured, and the last run they started.

Beside status.training (the last finished run's verdict) rather than in it: triggers
are evaluated, and may fire, before any run has finished.
"""

from __future__ import annotations

from enum import StrEnum

from recsys_contracts.api_base import ApiModel


class TriggerKind(StrEnum):
    PERFORMANCE = "Performance"
    DRIFT = "Drift"


class PerformanceReading(ApiModel):
    """The stable version's online CTR over the trigger's window and the window before it."""

    ctr: float | None = None
    """Clicks / impressions of the stable version over the last `window` (None: too few impressions)."""
    previous_ctr: float | None = None
    """The same over the window before it (what maxCtrDrop compares with)."""
    impressions: float = 0
    """Impressions of the stable version over the last `window`."""
    message: str = ""
    """What was decided, or why nothing could be (too few impressions, Prometheus unreachable)."""
    time: str
    """When it was measured (RFC 3339); a reading whose values did not change is not rewritten, so this is when they last changed."""


class DriftReading(ApiModel):
    """The drift statistic of the recent window against the reference window."""

    source: str
    """UserFeatures or ServedScores."""
    test: str
    """PSI or KS."""
    value: float | None = None
    """The statistic (None: not measurable now, see message)."""
    threshold: float
    """Beyond this the trigger fires."""
    recent_count: float = 0
    """Observations in the recent window."""
    reference_count: float = 0
    """Observations in the reference window (the training window before the recent one)."""
    message: str = ""
    """What was decided, or why nothing could be."""
    time: str
    """When it was measured (RFC 3339); a reading whose values did not change is not rewritten, so this is when they last changed."""


class TriggerRecord(ApiModel):
    """A trigger that fired and the training Job it created."""

    trigger: TriggerKind
    """Performance or Drift."""
    check: str
    """Which condition: minCtr, maxCtrDrop, PSI or KS."""
    value: float
    """The measured value that crossed the threshold."""
    threshold: float
    """The threshold it crossed (for maxCtrDrop: the drop as a fraction)."""
    time: str
    """When the Job was created (RFC 3339)."""
    job: str
    """The Job created from the training CronJob's template."""


class TrainingTriggersStatus(ApiModel):
    """Readings of spec.training.triggers and the last run a trigger started."""

    performance: PerformanceReading | None = None
    """The latest CTR reading (spec.training.triggers.performance set)."""
    drift: DriftReading | None = None
    """The latest drift reading (spec.training.triggers.drift set)."""
    last_trigger: TriggerRecord | None = None
    """The last trigger that started a run."""
    waiting: str | None = None
    """A trigger that fired but started no run yet, and why (a run active, the cooldown, suspend)."""
