"""Deciding whether spec.training.triggers fire: pure functions of the readings.

A trigger fires only on numbers: too few impressions or scores, or a Prometheus that did
not answer, is a reading with a message and no decision. Firing starts a run only when
no training run is active and the cooldown since the last run's start has passed
(`hold_reason`), so a drift that lasts does not start a run every minute.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from recsys_contracts.api_base import parse_duration
from recsys_operator.api.training import (
    DriftSource,
    DriftTest,
    DriftTrigger,
    PerformanceTrigger,
    TrainingSpec,
    TriggersSpec,
)
from recsys_operator.api.trigger_status import DriftReading, PerformanceReading, TriggerKind
from recsys_operator.retraining.drift import Distributions, DriftInputError, ks, psi
from recsys_operator.retraining.trigger_metrics import Ctr

MIN_IMPRESSIONS = 500
"""Impressions a CTR window needs before it is compared (a CTR of 5% on 500 impressions
is known to about ±2 points: enough to see a floor crossed, not a 1-point drift)."""
MIN_OBSERVATIONS = 500
"""Served scores each drift window needs: on small samples PSI is biased upward. Two
samples of 500 from one Beta(6, 3) score distribution, over these 22 buckets, give PSI
0.07 on average and 0.12 at the 95th percentile (300 draws), under the default threshold
of 0.2; fewer would make a trigger fire on noise."""

NO_ANSWER = "Prometheus gave no answer"

UNSUPPORTED_SOURCE = (
    "drift of UserFeatures is not supported yet (the feature job exports no feature "
    "histogram); use source ServedScores"
)


class TriggerMetrics(Protocol):
    def ctr(self, version: str, window_s: float, offset_s: float = 0.0) -> Ctr | None: ...

    def score_histogram(
        self, version: str, window_s: float, offset_s: float = 0.0
    ) -> dict[str, float] | None: ...


@dataclass(frozen=True)
class Firing:
    """A trigger condition that holds now."""

    trigger: TriggerKind
    check: str  # minCtr | maxCtrDrop | PSI | KS
    value: float
    threshold: float
    message: str


@dataclass
class Readings:
    performance: PerformanceReading | None = None
    drift: DriftReading | None = None
    firings: tuple[Firing, ...] = ()
    unsupported: str | None = None  # a trigger that cannot be evaluated, and why


def read_performance(
    spec: PerformanceTrigger, recent: Ctr | None, previous: Ctr | None, now: str
) -> tuple[PerformanceReading, list[Firing]]:
    """The CTR reading and the conditions of `spec` it meets."""
    if recent is None:
        return PerformanceReading(message=NO_ANSWER, time=now), []
    reading = PerformanceReading(impressions=recent.impressions, time=now)
    if recent.impressions < MIN_IMPRESSIONS:
        reading.message = (
            f"{recent.impressions:.0f} impressions over {spec.window}; {MIN_IMPRESSIONS} needed"
        )
        return reading, []
    ctr = recent.clicks / recent.impressions
    reading.ctr = round(ctr, 6)
    firings, notes = [], [f"CTR {ctr:.4f} over {spec.window}"]
    if spec.min_ctr is not None:
        if ctr < spec.min_ctr:
            firings.append(
                Firing(
                    TriggerKind.PERFORMANCE,
                    "minCtr",
                    round(ctr, 6),
                    spec.min_ctr,
                    f"stable CTR {ctr:.4f} over {spec.window} is below minCtr {spec.min_ctr:g}",
                )
            )
        notes.append(f"minCtr {spec.min_ctr:g}")
    if spec.max_ctr_drop is not None:
        if previous is None or previous.impressions < MIN_IMPRESSIONS or not previous.clicks:
            notes.append("the window before it has too few impressions or clicks to compare")
        else:
            before = previous.clicks / previous.impressions
            reading.previous_ctr = round(before, 6)
            drop = round(1 - ctr / before, 9)  # 0.04 vs 0.05 is a 20% drop, not 20.0000001%
            notes.append(f"{drop:+.1%} drop from {before:.4f}, maxCtrDrop {spec.max_ctr_drop:g}")
            if drop > spec.max_ctr_drop:
                firings.append(
                    Firing(
                        TriggerKind.PERFORMANCE,
                        "maxCtrDrop",
                        round(drop, 6),
                        spec.max_ctr_drop,
                        f"stable CTR fell {drop:.1%} (from {before:.4f} to {ctr:.4f}) over "
                        f"{spec.window}, beyond maxCtrDrop {spec.max_ctr_drop:g}",
                    )
                )
    reading.message = "; ".join(notes)
    return reading, firings


def read_drift(
    spec: DriftTrigger,
    recent: Mapping[str, float] | None,
    reference: Mapping[str, float] | None,
    now: str,
) -> tuple[DriftReading, list[Firing]]:
    """The drift reading of the recent histogram against the reference one."""
    reading = DriftReading(
        source=spec.source.value, test=spec.test.value, threshold=spec.threshold, time=now
    )
    if recent is None or reference is None:
        reading.message = NO_ANSWER
        return reading, []
    try:
        shares = Distributions.of(recent, reference)
    except DriftInputError as exc:
        reading.message = f"not measurable: {exc}"
        return reading, []
    reading.recent_count = round(shares.recent_total, 3)
    reading.reference_count = round(shares.reference_total, 3)
    if min(shares.recent_total, shares.reference_total) < MIN_OBSERVATIONS:
        reading.message = (
            f"{shares.recent_total:.0f} recent and {shares.reference_total:.0f} reference "
            f"scores; {MIN_OBSERVATIONS} needed in each"
        )
        return reading, []
    statistic = psi if spec.test is DriftTest.PSI else ks
    value = statistic(shares.recent, shares.reference)
    reading.value = round(value, 6)
    verb = "beyond" if value > spec.threshold else "within"
    reading.message = (
        f"{spec.test.value} {value:.4f} of served scores over {spec.window} against the "
        f"training window before it, {verb} threshold {spec.threshold:g}"
    )
    if value <= spec.threshold:
        return reading, []
    firing = Firing(
        TriggerKind.DRIFT, spec.test.value, reading.value, spec.threshold, reading.message
    )
    return reading, [firing]


async def take_readings(
    training: TrainingSpec, metrics: TriggerMetrics, version: str, now: str
) -> Readings:
    """Query what the triggers of `training` need (in threads) and decide each."""
    triggers = training.triggers
    readings = Readings()
    firings: list[Firing] = []
    if triggers.performance is not None:
        window_s = parse_duration(triggers.performance.window)
        recent, previous = await asyncio.gather(
            asyncio.to_thread(metrics.ctr, version, window_s),
            asyncio.to_thread(metrics.ctr, version, window_s, window_s),
        )
        readings.performance, found = read_performance(triggers.performance, recent, previous, now)
        firings += found
    drift = triggers.drift
    if drift is not None and drift.source is DriftSource.USER_FEATURES:
        readings.drift = DriftReading(
            source=drift.source.value,
            test=drift.test.value,
            threshold=drift.threshold,
            message=UNSUPPORTED_SOURCE,
            time=now,
        )
        readings.unsupported = UNSUPPORTED_SOURCE
    elif drift is not None:
        window_s = parse_duration(drift.window)
        reference_s = parse_duration(training.window)
        recent_scores, reference_scores = await asyncio.gather(
            asyncio.to_thread(metrics.score_histogram, version, window_s),
            asyncio.to_thread(metrics.score_histogram, version, reference_s, window_s),
        )
        readings.drift, found = read_drift(drift, recent_scores, reference_scores, now)
        firings += found
    readings.firings = tuple(firings)
    return readings


def cooldown_s(triggers: TriggersSpec) -> float:
    """spec.training.triggers.cooldown, else the longest window of the triggers set."""
    if triggers.cooldown is not None:
        return parse_duration(triggers.cooldown)
    windows = [t.window for t in (triggers.performance, triggers.drift) if t is not None]
    return max((parse_duration(w) for w in windows), default=0.0)


def hold_reason(
    *,
    now_s: float,
    active_jobs: list[str],
    last_start_s: float | None,
    cooldown: float,
    suspended: bool,
) -> str | None:
    """Why a trigger that fired starts no run now (None: it starts one)."""
    if suspended:
        return "spec.training.suspend is set"
    if active_jobs:
        return f"training run {', '.join(sorted(active_jobs))} is still active"
    if last_start_s is not None and now_s - last_start_s < cooldown:
        left = cooldown - (now_s - last_start_s)
        return f"cooldown: the last run started {now_s - last_start_s:.0f}s ago, {left:.0f}s left"
    return None
