"""Judging a canary against the stable version over one analysis window. Pure.

The rules, in order:
1. no answer from the metrics source (empty vector, NaN) -> Inconclusive, never a pass;
2. canary p99 latency above the threshold -> Fail;
3. canary error rate above the threshold -> Fail;
4. fewer impressions than required on either side -> Wait;
5. canary CTR significantly below minCtrRatio x stable CTR (one-sided
   two-proportion z-test at the configured confidence) -> Fail; otherwise Pass.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from recsys_operator.api.recommender_system import AnalysisSpec
from recsys_operator.api.status import AnalysisDecision, AnalysisResult, now_rfc3339


@dataclass(frozen=True)
class VariantMetrics:
    """One variant's numbers over the window; None means the source had no answer."""

    p99_ms: float | None
    requests: float | None
    errors: float | None
    impressions: float | None
    clicks: float | None

    @property
    def error_rate(self) -> float | None:
        if self.requests is None or self.errors is None:
            return None
        return self.errors / self.requests if self.requests > 0 else 0.0

    @property
    def ctr(self) -> float | None:
        if self.impressions is None or self.clicks is None or self.impressions <= 0:
            return None
        return self.clicks / self.impressions


def clean(value: float | None) -> float | None:
    """None for missing or NaN/inf answers (Prometheus returns NaN for 0/0 and empty histograms)."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return float(value)


def counter_increase(samples: Sequence[float]) -> float | None:
    """Increase of a counter over consecutive samples, counting through resets (as PromQL's increase)."""
    if len(samples) < 2:
        return None
    total = 0.0
    for before, after in itertools.pairwise(samples):
        total += after - before if after >= before else after  # a reset restarts from zero
    return total


def normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def ctr_p_value(
    canary_clicks: float,
    canary_impr: float,
    stable_clicks: float,
    stable_impr: float,
    min_ratio: float,
) -> float:
    """p-value of H1 "canary CTR < min_ratio x stable CTR" (small means the canary is worse).

    z = (p_c - r p_s) / sqrt(p_c (1 - p_c) / n_c + r^2 p_s (1 - p_s) / n_s), p = Phi(z).
    """
    p_c = canary_clicks / canary_impr
    p_s = stable_clicks / stable_impr
    variance = p_c * (1 - p_c) / canary_impr + min_ratio**2 * p_s * (1 - p_s) / stable_impr
    diff = p_c - min_ratio * p_s
    if variance <= 0:  # all-or-nothing click rates: the sign of the difference decides
        return 0.0 if diff < 0 else 1.0
    return normal_cdf(diff / math.sqrt(variance))


def analyse(canary: VariantMetrics, stable: VariantMetrics, spec: AnalysisSpec) -> AnalysisResult:
    canary = VariantMetrics(
        *(
            clean(v)
            for v in (
                canary.p99_ms,
                canary.requests,
                canary.errors,
                canary.impressions,
                canary.clicks,
            )
        )
    )
    stable = VariantMetrics(
        *(
            clean(v)
            for v in (
                stable.p99_ms,
                stable.requests,
                stable.errors,
                stable.impressions,
                stable.clicks,
            )
        )
    )
    numbers = {
        "canary_p99_ms": canary.p99_ms,
        "stable_p99_ms": stable.p99_ms,
        "canary_error_rate": canary.error_rate,
        "canary_ctr": canary.ctr,
        "stable_ctr": stable.ctr,
        "canary_impressions": int(canary.impressions) if canary.impressions is not None else None,
        "stable_impressions": int(stable.impressions) if stable.impressions is not None else None,
    }

    def result(
        decision: AnalysisDecision, reason: str, p_value: float | None = None
    ) -> AnalysisResult:
        return AnalysisResult(
            time=now_rfc3339(), decision=decision, reason=reason, p_value=p_value, **numbers
        )

    # Errors first: a canary whose requests fail (or fall back) has no impressions of
    # its own, and must fail rather than wait for impressions that never come.
    error_rate = canary.error_rate
    if error_rate is not None and error_rate > spec.max_error_rate:
        return result(
            AnalysisDecision.FAIL,
            f"canary error rate {error_rate:.4f} exceeds {spec.max_error_rate:g}",
        )
    missing = [
        name
        for name, value in (
            ("canary p99 latency", canary.p99_ms),
            ("canary requests", canary.requests),
            ("canary impressions", canary.impressions),
            ("stable impressions", stable.impressions),
        )
        if value is None
    ]
    if missing:
        return result(AnalysisDecision.INCONCLUSIVE, f"no data for {', '.join(missing)}")
    assert (
        canary.p99_ms is not None
        and canary.impressions is not None
        and stable.impressions is not None
    )
    if canary.p99_ms > spec.max_p99_latency_ms:
        return result(
            AnalysisDecision.FAIL,
            f"canary p99 latency {canary.p99_ms:.1f} ms exceeds {spec.max_p99_latency_ms:g} ms",
        )
    if canary.impressions < spec.min_impressions or stable.impressions < spec.min_impressions:
        return result(
            AnalysisDecision.WAIT,
            f"too few impressions: canary {canary.impressions:.0f}, stable {stable.impressions:.0f}, "
            f"need {spec.min_impressions} each",
        )
    if canary.clicks is None or stable.clicks is None:
        return result(AnalysisDecision.INCONCLUSIVE, "no data for clicks")
    p_value = ctr_p_value(
        canary.clicks, canary.impressions, stable.clicks, stable.impressions, spec.min_ctr_ratio
    )
    alpha = 1 - spec.confidence
    ctr_text = f"canary CTR {canary.ctr:.4f} vs stable {stable.ctr:.4f} (min ratio {spec.min_ctr_ratio:g}, p={p_value:.4g})"
    if p_value < alpha:
        return result(
            AnalysisDecision.FAIL,
            f"{ctr_text}: significantly below at {spec.confidence:g} confidence",
            p_value,
        )
    return result(
        AnalysisDecision.PASS,
        f"p99 {canary.p99_ms:.1f} ms, error rate {error_rate or 0:.4f}, {ctr_text}",
        p_value,
    )
