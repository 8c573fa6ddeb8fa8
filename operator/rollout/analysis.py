"""Judging a canary against the stable version over one analysis window. Pure.

The rules, in order:
1. canary error rate above the threshold -> Fail (first: a canary whose requests all
   fall back has no impressions of its own, and must not wait for them);
2. no answer from the metrics source (empty vector, NaN) -> Inconclusive, never a pass;
3. canary p99 latency above the threshold -> Fail;
4. fewer impressions than required on either side -> Wait (with the impressions a
   drop of minDetectableDrop would need, when they can be estimated);
5. the canary's share of impressions off its weight (sample-ratio mismatch) ->
   SampleRatioMismatch: the numbers cannot be trusted, so the step holds;
6. canary CTR (or a guardrail rate) significantly below its min ratio x stable's at
   this look's share of the false-rollback budget -> Fail; otherwise Pass (saying how
   many more impressions a drop of minDetectableDrop would have needed, if any).

The rates are compared over every step since the canary started, each step's own
canary-versus-stable difference combined with inverse-variance weights (stratified by
step); the variance comes from the spread between user buckets (`ratio_test`), the
per-look significance level from the spending plan over the steps (`spending`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from recsys_contracts.metric_names import ANALYSIS_BUCKETS
from recsys_operator.api.recommender_system import AnalysisSpec
from recsys_operator.api.status import (
    AnalysisDecision,
    AnalysisResult,
    GuardrailResult,
    now_rfc3339,
)
from recsys_operator.rollout.ratio_test import (
    Buckets,
    RatioComparison,
    Stratum,
    compare_strata,
    sample_ratio,
)
from recsys_operator.rollout.spending import analysed_weights, cumulative_level, look_alpha

GROUP_SEQUENTIAL_LEVELS = False
"""Whether cumulative looks use the group-sequential levels (`spending.cumulative_levels`)
instead of the union-bound shares. Off: measured over 4,000 simulated A/A rollouts at
realistic spread, the group-sequential levels rolled back 5.7% (standard error 0.35)
against the 5% budget; they assume independent increments between looks, which users
who stay on one side across steps break (docs/rollout-analysis.md, Limits). The union
bound holds for any dependence."""

MIN_BUCKETS = 16
"""User buckets with impressions below which the variance is not trusted (of 64)."""


@dataclass(frozen=True)
class VariantMetrics:
    """One variant's numbers over the window; None means the source had no answer.

    Impressions and the outcome counts are per user bucket (bucket label -> count)."""

    p99_ms: float | None
    requests: float | None
    errors: float | None
    impressions: Buckets | None
    clicks: Buckets | None
    dwell_seconds: Buckets | None = None
    purchases: Buckets | None = None

    @property
    def error_rate(self) -> float | None:
        if self.requests is None or self.errors is None:
            return None
        return self.errors / self.requests if self.requests > 0 else 0.0

    @property
    def impression_count(self) -> float | None:
        return None if self.impressions is None else sum(self.impressions.values())

    @property
    def ctr(self) -> float | None:
        n = self.impression_count
        if n is None or self.clicks is None or n <= 0:
            return None
        return sum(self.clicks.values()) / n


@dataclass(frozen=True)
class Look:
    """Which analysis of the rollout this is: the step, its weight and its level.

    A cumulative look tests every step since the canary started, combined; its levels
    are the group-sequential ones (`spending.cumulative_levels`). A look on its own
    step's window only gets the union-bound share (`spending.look_alphas`), valid for
    any dependence between looks; both spend the same alpha t^rho, so a rollout whose
    step history is incomplete may mix them."""

    step: int
    weight: int
    alpha: float
    """This look's level when only CTR is tested."""
    metric_alphas: tuple[float, ...] = ()
    """The level of each metric when 1, 2 or 3 metrics are tested (CTR, dwell, purchase);
    empty: alpha split equally (the union bound over metrics, right for a single look)."""
    cumulative: bool = False

    def alpha_for(self, metrics: int) -> float:
        if len(self.metric_alphas) >= metrics:
            return self.metric_alphas[metrics - 1]
        return self.alpha / metrics

    @classmethod
    def at(
        cls,
        steps: Sequence[int],
        step: int,
        confidence: float,
        cumulative: bool = True,
        sample_ratio_p_value: float = 0.0,
    ) -> Look:
        """The look at index `step`. With `sample_ratio_p_value`, the rate tests leave
        K x sampleRatioPValue of the budget (K analysed steps) to the sample-ratio check,
        whose false alarms can end a rollout too: every cause of a rollback of a good
        canary then fits in 1 - confidence together (union bound). The rate tests keep at
        least half the budget (a check at a level that is not small against the budget,
        e.g. 0.001 at confidence 0.999, is then outside the bound: docs/rollout-analysis.md)."""
        levels = cumulative_level if cumulative and GROUP_SEQUENTIAL_LEVELS else look_alpha
        alpha = 1 - confidence
        reserved = min(len(analysed_weights(steps)) * sample_ratio_p_value, alpha / 2)
        budget = alpha - reserved
        # Each metric gets 1/m of the budget and its own boundaries (union bound over metrics).
        alphas = tuple(levels(steps, step, budget / m) for m in (1, 2, 3))
        return cls(
            step=step,
            weight=steps[step],
            alpha=alphas[0],
            metric_alphas=alphas,
            cumulative=cumulative,
        )


@dataclass(frozen=True)
class StepMetrics:
    """An earlier step's counts per user bucket, over its whole window, both variants."""

    canary: VariantMetrics
    stable: VariantMetrics


def clean(value: float | None) -> float | None:
    """None for missing or NaN/inf answers (Prometheus returns NaN for 0/0 and empty histograms)."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return float(value)


def clean_buckets(buckets: Buckets | None) -> dict[str, float] | None:
    if buckets is None:
        return None
    kept = {b: v for b, v in buckets.items() if clean(v) is not None}
    return kept if kept else None


def counter_increase(samples: Sequence[float]) -> float | None:
    """Increase of a counter over consecutive samples, counting through resets (as PromQL's increase)."""
    if len(samples) < 2:
        return None
    total = 0.0
    for before, after in itertools.pairwise(samples):
        total += after - before if after >= before else after  # a reset restarts from zero
    return total


def _cleaned(m: VariantMetrics) -> VariantMetrics:
    return VariantMetrics(
        clean(m.p99_ms),
        clean(m.requests),
        clean(m.errors),
        clean_buckets(m.impressions),
        clean_buckets(m.clicks) or ({} if m.clicks is not None else None),
        clean_buckets(m.dwell_seconds) or ({} if m.dwell_seconds is not None else None),
        clean_buckets(m.purchases) or ({} if m.purchases is not None else None),
    )


def _more_impressions_text(needed: float, have: float, look: Look, spec: AnalysisSpec) -> str:
    drop = f"{spec.min_detectable_drop:.0%} CTR drop"
    if 1 - spec.min_detectable_drop >= spec.min_ctr_ratio:
        return f"a {drop} is within minCtrRatio {spec.min_ctr_ratio:g}, so no test would flag it"
    if math.isinf(needed):
        return f"no clicks on stable yet to size a test for a {drop}"
    return (
        f"about {max(needed - have, 0):,.0f} more impressions (both variants, at {look.weight}%) "
        f"to detect a {drop} with {spec.power:.0%} power"
    )


def _strata(earlier: Sequence[StepMetrics], metric: str) -> list[Stratum] | None:
    """The earlier steps' counts of `metric` (clicks, dwell_seconds, purchases), in order;
    None when a step lacks them on either side (never judged on part of the data)."""
    strata = []
    for c, s in [(step.canary, step.stable) for step in earlier]:
        y_c, y_s = getattr(c, metric), getattr(s, metric)
        if c.impressions is None or s.impressions is None or y_c is None or y_s is None:
            return None
        if sum(c.impressions.values()) <= 0 or sum(s.impressions.values()) <= 0:
            return None
        strata.append(Stratum(y_c, c.impressions, y_s, s.impressions))
    return strata


def analyse(
    canary: VariantMetrics,
    stable: VariantMetrics,
    spec: AnalysisSpec,
    look: Look,
    earlier: Sequence[StepMetrics] = (),
) -> AnalysisResult:
    """Judge this step's window; `earlier` (the previous steps' windows, in order) are
    combined into the rate comparisons, stratified by step, for a cumulative look."""
    canary, stable = _cleaned(canary), _cleaned(stable)
    earlier = [StepMetrics(_cleaned(step.canary), _cleaned(step.stable)) for step in earlier]
    n_canary, n_stable = canary.impression_count, stable.impression_count
    numbers: dict[str, object] = {
        "canary_p99_ms": canary.p99_ms,
        "stable_p99_ms": stable.p99_ms,
        "canary_error_rate": canary.error_rate,
        "canary_ctr": canary.ctr,
        "stable_ctr": stable.ctr,
        "canary_impressions": int(n_canary) if n_canary is not None else None,
        "stable_impressions": int(n_stable) if n_stable is not None else None,
    }

    def result(decision: AnalysisDecision, reason: str) -> AnalysisResult:
        return AnalysisResult(time=now_rfc3339(), decision=decision, reason=reason, **numbers)

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
    assert canary.p99_ms is not None and canary.impressions is not None
    assert stable.impressions is not None and n_canary is not None and n_stable is not None
    if canary.p99_ms > spec.max_p99_latency_ms:
        return result(
            AnalysisDecision.FAIL,
            f"canary p99 latency {canary.p99_ms:.1f} ms exceeds {spec.max_p99_latency_ms:g} ms",
        )
    if canary.clicks is None or stable.clicks is None:
        return result(AnalysisDecision.INCONCLUSIVE, "no data for clicks")
    if set(canary.impressions) | set(stable.impressions) <= {""}:
        return result(
            AnalysisDecision.INCONCLUSIVE,
            "impressions carry no user bucket label (a gateway older than the bucketed metrics?)",
        )

    # Every metric tested at this look gets an equal share of the look's alpha.
    guardrails = [
        (name, counts_c, counts_s, ratio)
        for name, counts_c, counts_s, ratio in (
            ("dwell", canary.dwell_seconds, stable.dwell_seconds, spec.min_dwell_ratio),
            ("purchase", canary.purchases, stable.purchases, spec.min_purchase_ratio),
        )
        if ratio is not None
    ]
    alpha = look.alpha_for(1 + len(guardrails))
    numbers["alpha"] = alpha
    if earlier:
        numbers["steps_combined"] = len(earlier) + 1

    ctr: RatioComparison | None = None
    ctr_strata = _strata(earlier, "clicks")
    if ctr_strata is None:
        return result(
            AnalysisDecision.INCONCLUSIVE,
            "no impressions or clicks for an earlier step's window, which this look combines",
        )
    if n_canary > 0 and n_stable > 0:
        ctr_strata.append(
            Stratum(canary.clicks, canary.impressions, stable.clicks, stable.impressions)
        )
        ctr = compare_strata(ctr_strata, spec.min_ctr_ratio)
        numbers["ctr_std_error"] = ctr.std_error
        if alpha > 0:
            needed = ctr.impressions_needed(spec.min_detectable_drop, alpha, spec.power)
            numbers["impressions_needed"] = None if math.isinf(needed) else math.ceil(needed)
    have = ctr.impressions if ctr is not None else n_canary + n_stable

    if n_canary < spec.min_impressions or n_stable < spec.min_impressions:
        reason = (
            f"too few impressions: canary {n_canary:.0f}, stable {n_stable:.0f}, "
            f"need {spec.min_impressions} each"
        )
        if ctr is not None and alpha > 0:
            reason += "; " + _more_impressions_text(
                ctr.impressions_needed(spec.min_detectable_drop, alpha, spec.power),
                have,
                look,
                spec,
            )
        return result(AnalysisDecision.WAIT, reason)
    assert ctr is not None
    if ctr.buckets < MIN_BUCKETS:
        return result(
            AnalysisDecision.WAIT,
            f"impressions from only {ctr.buckets} of {ANALYSIS_BUCKETS} user buckets; "
            f"the variance needs at least {MIN_BUCKETS}",
        )

    srm = sample_ratio(canary.impressions, stable.impressions, look.weight / 100)
    numbers["canary_share"] = srm.canary_share
    numbers["sample_ratio_p_value"] = srm.p_value
    if srm.p_value < spec.sample_ratio_p_value:
        return result(
            AnalysisDecision.SAMPLE_RATIO_MISMATCH,
            f"sample-ratio mismatch: the canary has {srm.canary_share:.1%} of impressions at weight "
            f"{look.weight}% (chi-square {srm.chi_square:.1f}, p={srm.p_value:.2g} < "
            f"{spec.sample_ratio_p_value:g}); assignment or attribution is off, so the numbers "
            "are not judged",
        )

    if alpha <= 0:
        return result(
            AnalysisDecision.INCONCLUSIVE,
            f"step {look.step} is outside the spending plan of the steps; nothing is judged",
        )
    over = f" over steps 0-{look.step}, stratified" if earlier else ""
    ctr_text = (
        f"canary CTR {ctr.canary_rate:.4f} vs stable {ctr.stable_rate:.4f}{over} "
        f"(min ratio {spec.min_ctr_ratio:g}, p={ctr.p_value:.4g}, alpha={alpha:.4g})"
    )
    needed = ctr.impressions_needed(spec.min_detectable_drop, alpha, spec.power)
    if have < needed:  # said on a pass, so an underpowered promotion is visible
        ctr_text += f"; {_more_impressions_text(needed, have, look, spec)} at this look"
    numbers["p_value"] = ctr.p_value
    checked: list[GuardrailResult] = []
    for name, counts_c, counts_s, min_ratio in guardrails:
        metric = {"dwell": "dwell_seconds", "purchase": "purchases"}[name]
        guard_strata = _strata(earlier, metric)
        if counts_c is None or counts_s is None or guard_strata is None:
            return result(AnalysisDecision.INCONCLUSIVE, f"no data for {name}")
        assert min_ratio is not None
        guard_strata.append(Stratum(counts_c, canary.impressions, counts_s, stable.impressions))
        guard = compare_strata(guard_strata, min_ratio)
        checked.append(
            GuardrailResult(
                metric=name,
                canary_rate=guard.canary_rate,
                stable_rate=guard.stable_rate,
                min_ratio=min_ratio,
                p_value=guard.p_value,
            )
        )
    numbers["guardrails"] = checked

    if ctr.p_value < alpha:
        return result(
            AnalysisDecision.FAIL,
            f"{ctr_text}: significantly below at {spec.confidence:g} confidence over the rollout",
        )
    for guard_result in checked:
        if guard_result.p_value < alpha:
            return result(
                AnalysisDecision.FAIL,
                f"canary {guard_result.metric} per impression {guard_result.canary_rate:.4g} vs "
                f"stable {guard_result.stable_rate:.4g} (min ratio {guard_result.min_ratio:g}, "
                f"p={guard_result.p_value:.4g}, alpha={alpha:.4g}): significantly below",
            )
    return result(
        AnalysisDecision.PASS,
        f"p99 {canary.p99_ms:.1f} ms, error rate {error_rate or 0:.4f}, {ctr_text}",
    )
