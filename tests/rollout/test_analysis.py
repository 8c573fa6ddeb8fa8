"""Table-driven cases of the canary analysis: data problems are never a pass; the
rates are judged with the bucket variance at this look's share of the budget."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from recsys_operator.api.recommender_system import AnalysisSpec
from recsys_operator.api.status import AnalysisDecision
from recsys_operator.rollout import analysis
from recsys_operator.rollout.analysis import (
    Look,
    StepMetrics,
    VariantMetrics,
    analyse,
    counter_increase,
)
from recsys_operator.rollout.spending import cumulative_level, look_alpha

SPEC = AnalysisSpec(
    max_p99_latency_ms=50,
    max_error_rate=0.01,
    min_ctr_ratio=0.95,
    min_impressions=1000,
    confidence=0.95,
)
LOOK = Look(step=1, weight=50, alpha=0.05)  # one look with the whole budget
NAN = float("nan")


def buckets(total: float, seed: int, buckets: int = 64) -> dict[str, float]:
    """`total` spread over user buckets as users spread them (multinomial, seeded)."""
    counts = np.random.default_rng(seed).multinomial(int(total), np.full(buckets, 1 / buckets))
    return {str(b): float(c) for b, c in enumerate(counts)}


def v(
    p99: float | None = 20.0,
    requests: float | None = 5000,
    errors: float | None = 0,
    impressions: float | None = 5000,
    clicks: float | None = 500,
    seed: int = 1,
) -> VariantMetrics:
    return VariantMetrics(
        p99,
        requests,
        errors,
        None if impressions is None else buckets(impressions, seed),
        None if clicks is None else buckets(clicks, seed + 100),
    )


CASES = [
    ("healthy canary, same CTR", v(), v(seed=2), AnalysisDecision.PASS, "p99 20.0 ms"),
    (
        "canary CTR clearly lower",
        v(clicks=300),
        v(clicks=500, seed=2),
        AnalysisDecision.FAIL,
        "significantly below",
    ),
    (
        "canary CTR a bit lower, not significant",
        v(clicks=470),
        v(clicks=500, seed=2),
        AnalysisDecision.PASS,
        "p=",
    ),
    (
        "canary CTR higher",
        v(clicks=700),
        v(clicks=500, seed=2),
        AnalysisDecision.PASS,
        "canary CTR 0.1400",
    ),
    (
        "latency over threshold",
        v(p99=80.0),
        v(seed=2),
        AnalysisDecision.FAIL,
        "p99 latency 80.0 ms exceeds 50 ms",
    ),
    (
        "error rate over threshold",
        v(errors=100),
        v(seed=2),
        AnalysisDecision.FAIL,
        "error rate 0.0200 exceeds",
    ),
    (
        # Serving failed, the gateway answered from the fallback: no impressions of its own.
        "every canary request fell back",
        v(p99=None, errors=5000, impressions=None, clicks=None),
        v(seed=2),
        AnalysisDecision.FAIL,
        "error rate 1.0000 exceeds",
    ),
    ("NaN latency (empty histogram)", v(p99=NAN), v(), AnalysisDecision.INCONCLUSIVE, "canary p99"),
    (
        "empty vector for canary impressions",
        v(impressions=None),
        v(seed=2),
        AnalysisDecision.INCONCLUSIVE,
        "canary impressions",
    ),
    (
        "Prometheus down: nothing at all",
        VariantMetrics(None, None, None, None, None),
        VariantMetrics(None, None, None, None, None),
        AnalysisDecision.INCONCLUSIVE,
        "no data",
    ),
    (
        "clicks unknown",
        v(clicks=None),
        v(seed=2),
        AnalysisDecision.INCONCLUSIVE,
        "no data for clicks",
    ),
    (
        "zero impressions",
        v(impressions=0, clicks=0),
        v(seed=2),
        AnalysisDecision.WAIT,
        "too few impressions",
    ),
    (
        "too few stable impressions",
        v(),
        v(impressions=10, clicks=1, seed=2),
        AnalysisDecision.WAIT,
        "stable 10",
    ),
    ("infinite latency is missing", v(p99=math.inf), v(), AnalysisDecision.INCONCLUSIVE, "no data"),
    (
        "no clicks anywhere: equal, not worse",
        v(clicks=0),
        v(clicks=0, seed=2),
        AnalysisDecision.PASS,
        "canary CTR 0.0000",
    ),
    (
        "canary no clicks, stable clicks",
        v(clicks=0),
        v(clicks=500, seed=2),
        AnalysisDecision.FAIL,
        "significantly below",
    ),
    (
        # 3,000 of 10,000 impressions on the canary at a 50% weight.
        "canary share far off its weight",
        v(impressions=3000, clicks=300),
        v(impressions=7000, clicks=700, seed=2),
        AnalysisDecision.SAMPLE_RATIO_MISMATCH,
        "30.0% of impressions at weight 50%",
    ),
    (
        "a gateway without bucket labels",
        VariantMetrics(20.0, 5000, 0, {"": 5000}, {"": 500}),
        VariantMetrics(20.0, 5000, 0, {"": 5000}, {"": 500}),
        AnalysisDecision.INCONCLUSIVE,
        "no user bucket label",
    ),
    (
        "impressions from a handful of users' buckets",
        VariantMetrics(20.0, 5000, 0, buckets(5000, 1, 8), buckets(500, 2, 8)),
        VariantMetrics(20.0, 5000, 0, buckets(5000, 3, 8), buckets(500, 4, 8)),
        AnalysisDecision.WAIT,
        "only 8 of 64 user buckets",
    ),
]


@pytest.mark.parametrize(
    ("name", "canary", "stable", "decision", "phrase"), CASES, ids=[c[0] for c in CASES]
)
def test_analysis(
    name: str,
    canary: VariantMetrics,
    stable: VariantMetrics,
    decision: AnalysisDecision,
    phrase: str,
) -> None:
    result = analyse(canary, stable, SPEC, LOOK)
    assert result.decision is decision, result.reason
    assert phrase in result.reason


def test_failed_ctr_records_the_numbers() -> None:
    result = analyse(v(clicks=300), v(clicks=500, seed=2), SPEC, LOOK)
    assert result.canary_ctr == pytest.approx(0.06)
    assert result.stable_ctr == pytest.approx(0.10)
    assert result.canary_impressions == 5000 and result.stable_impressions == 5000
    assert result.p_value is not None and result.p_value < 0.05
    assert result.alpha == pytest.approx(0.05)
    assert result.ctr_std_error is not None and result.ctr_std_error > 0
    assert result.canary_share == pytest.approx(0.5)
    assert result.sample_ratio_p_value is not None and result.sample_ratio_p_value > 0.001


def clumpy(impressions: int, ctr: float, seed: int, concentration: float = 400) -> VariantMetrics:
    """Per-bucket clicks that differ between buckets more than binomially (users differ):
    bucket click rates from a Beta with mean `ctr` (smaller concentration, more spread)."""
    rng = np.random.default_rng(seed)
    n = rng.multinomial(impressions, np.full(64, 1 / 64))
    rate = rng.beta(ctr * concentration, (1 - ctr) * concentration, 64)
    y = rng.binomial(n, rate)
    return VariantMetrics(
        20.0,
        float(impressions),
        0.0,
        {str(b): float(c) for b, c in enumerate(n)},
        {str(b): float(c) for b, c in enumerate(y)},
    )


def test_an_early_look_spends_less_than_the_whole_budget() -> None:
    # The same numbers (p about 0.026) fail where the whole 0.05 is spent and pass at the
    # first look of the default plan (alpha 0.0015): the first look keeps budget for later.
    stable, like = clumpy(20_000, 0.3, 2), clumpy(20_000, 0.3, 1)
    assert like.clicks is not None
    canary = VariantMetrics(
        20.0, 20_000, 0, like.impressions, {b: y * 0.93 for b, y in like.clicks.items()}
    )
    spec = AnalysisSpec(min_ctr_ratio=1.0, max_p99_latency_ms=50, min_impressions=1000)
    whole = analyse(canary, stable, spec, LOOK)
    assert whole.p_value == pytest.approx(0.0256, abs=1e-3)
    assert whole.decision is AnalysisDecision.FAIL
    first_alpha = Look.at([10, 25, 50, 100], 0, 0.95).alpha
    assert first_alpha == pytest.approx(0.0014555, abs=1e-6)
    first = analyse(canary, stable, spec, Look(step=0, weight=50, alpha=first_alpha))
    assert first.decision is AnalysisDecision.PASS, first.reason
    assert first.p_value == whole.p_value


def test_waiting_says_how_many_impressions_a_drop_needs() -> None:
    spec = AnalysisSpec(min_ctr_ratio=1.0, min_impressions=3000, min_detectable_drop=0.05)
    result = analyse(clumpy(2000, 0.3, 1), clumpy(2000, 0.3, 2), spec, LOOK)
    assert result.decision is AnalysisDecision.WAIT
    assert result.impressions_needed is not None and result.impressions_needed > 4000
    said = re.search(r"about ([\d,]+) more impressions \(both variants, at 50%\)", result.reason)
    assert said, result.reason
    assert int(said[1].replace(",", "")) == pytest.approx(result.impressions_needed - 4000, abs=1)
    assert "to detect a 5% CTR drop with 80% power" in result.reason


def test_the_needed_impressions_grow_with_the_spread_between_users() -> None:
    spec = AnalysisSpec(min_ctr_ratio=1.0, min_impressions=100)
    alike = analyse(
        v(impressions=5000, clicks=1500), v(impressions=5000, clicks=1500, seed=2), spec, LOOK
    )
    differ = analyse(clumpy(5000, 0.3, 1, 50), clumpy(5000, 0.3, 2, 50), spec, LOOK)
    assert alike.impressions_needed and differ.impressions_needed
    assert differ.impressions_needed > 1.5 * alike.impressions_needed


def with_guardrails(m: VariantMetrics, dwell: float, purchases: float, seed: int) -> VariantMetrics:
    return VariantMetrics(
        m.p99_ms,
        m.requests,
        m.errors,
        m.impressions,
        m.clicks,
        buckets(dwell, seed + 200),
        buckets(purchases, seed + 300),
    )


def test_a_dwell_guardrail_fails_a_canary_whose_ctr_is_fine() -> None:
    spec = AnalysisSpec(min_ctr_ratio=0.95, min_dwell_ratio=0.9, min_purchase_ratio=0.5)
    canary = with_guardrails(v(), dwell=30_000, purchases=50, seed=1)
    stable = with_guardrails(v(seed=2), dwell=60_000, purchases=50, seed=2)
    result = analyse(canary, stable, spec, LOOK)
    assert result.decision is AnalysisDecision.FAIL
    assert "canary dwell per impression 6 vs stable 12" in result.reason
    assert result.alpha == pytest.approx(0.05 / 3)  # CTR, dwell and purchase share the look
    assert [g.metric for g in result.guardrails] == ["dwell", "purchase"]
    assert result.guardrails[1].p_value > 0.05


def test_guardrails_without_data_are_inconclusive() -> None:
    spec = AnalysisSpec(min_ctr_ratio=0.95, min_purchase_ratio=0.9)
    result = analyse(v(), v(seed=2), spec, LOOK)
    assert result.decision is AnalysisDecision.INCONCLUSIVE
    assert "no data for purchase" in result.reason


@pytest.mark.parametrize(
    ("samples", "increase"),
    [
        ([0, 5, 10], 10),
        ([100, 120, 5, 15], 20 + 5 + 10),  # the process restarted between 120 and 5
        ([7, 7, 7], 0),
        ([3], None),
        ([], None),
    ],
)
def test_counter_increase_counts_through_resets(
    samples: list[float], increase: float | None
) -> None:
    assert counter_increase(samples) == increase


# Cumulative looks ----------------------------------------------------------------------


def drop_of(m: VariantMetrics, factor: float) -> VariantMetrics:
    assert m.clicks is not None
    return VariantMetrics(
        m.p99_ms, m.requests, m.errors, m.impressions, {b: y * factor for b, y in m.clicks.items()}
    )


def test_a_cumulative_look_combines_the_earlier_steps() -> None:
    # Each step 5% worse: the last step alone at p = 0.13 passes at the last look's level
    # (0.0439); the three steps together (p = 0.007) fail.
    spec = AnalysisSpec(min_ctr_ratio=1.0, max_p99_latency_ms=50, min_impressions=1000)
    steps = [
        StepMetrics(drop_of(clumpy(6_000, 0.3, 10 + k), 0.95), clumpy(6_000, 0.3, 20 + k))
        for k in range(3)
    ]
    look = Look.at([10, 25, 50, 100], 2, 0.95)
    alone = analyse(steps[2].canary, steps[2].stable, spec, look)
    combined = analyse(steps[2].canary, steps[2].stable, spec, look, steps[:2])
    assert alone.decision is AnalysisDecision.PASS and alone.steps_combined is None
    assert combined.decision is AnalysisDecision.FAIL, combined.reason
    assert combined.steps_combined == 3 and "over steps 0-2, stratified" in combined.reason
    assert combined.p_value is not None and alone.p_value is not None
    assert combined.p_value < alone.p_value
    assert combined.alpha == pytest.approx(look_alpha([10, 25, 50, 100], 2, 0.05))
    # The step's own numbers are still the window's (dashboards compare them with Grafana).
    assert combined.canary_ctr == alone.canary_ctr


def test_an_earlier_step_without_data_is_inconclusive() -> None:
    spec = AnalysisSpec(min_ctr_ratio=1.0, max_p99_latency_ms=50, min_impressions=1000)
    empty = VariantMetrics(None, None, None, None, None)
    earlier = [StepMetrics(empty, clumpy(8_000, 0.3, 1))]
    result = analyse(clumpy(8_000, 0.3, 2), clumpy(8_000, 0.3, 3), spec, LOOK, earlier)
    assert result.decision is AnalysisDecision.INCONCLUSIVE
    assert "earlier step" in result.reason


def test_a_look_gets_the_union_bound_level_unless_group_sequential_levels_are_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cumulative = Look.at([10, 25, 50, 100], 2, 0.95)
    alone = Look.at([10, 25, 50, 100], 2, 0.95, cumulative=False)
    assert alone.alpha == cumulative.alpha == pytest.approx(0.0361627, abs=1e-6)
    monkeypatch.setattr(analysis, "GROUP_SEQUENTIAL_LEVELS", True)
    sequential = Look.at([10, 25, 50, 100], 2, 0.95)
    assert sequential.alpha > alone.alpha
    # Three metrics: each gets its own boundaries at a third of the budget.
    assert sequential.alpha_for(3) == pytest.approx(
        cumulative_level([10, 25, 50, 100], 2, 0.05 / 3)
    )
    assert Look(step=1, weight=50, alpha=0.05).alpha_for(3) == pytest.approx(0.05 / 3)
    # The sample-ratio check's 3 x 0.001 is left out of the rate tests' budget.
    reserved = Look.at([10, 25, 50, 100], 2, 0.95, sample_ratio_p_value=0.001)
    assert reserved.alpha == pytest.approx(cumulative_level([10, 25, 50, 100], 2, 0.047))
    # ... but never more than half of it.
    strict = Look.at([50, 100], 0, 0.999, sample_ratio_p_value=0.001)
    assert strict.alpha == pytest.approx(0.0005)


def simulated_rollout(rng: np.random.Generator, drop: float) -> bool:
    """One rollout at the defaults through `analyse`, cumulative looks: True if rolled back.

    2,000 users with Beta(0.7, 1.3) click propensities (mean 0.35, concentration 2),
    Poisson(7) lists per user per step, users in 64 buckets, canary by position < weight."""
    users, steps = 2000, [10, 25, 50, 100]
    spec = AnalysisSpec()
    propensity = rng.beta(0.7, 1.3, users)
    position = rng.random(users) * 100
    bucket = rng.integers(0, 64, users)
    earlier: list[StepMetrics] = []
    for step, weight in enumerate(steps[:-1]):
        lists = rng.poisson(7.0, users)
        on_canary = position < weight
        clicks = rng.binomial(lists, np.where(on_canary, propensity * (1 - drop), propensity))
        sides = []
        for side in (on_canary, ~on_canary):
            n = np.bincount(bucket[side], lists[side], 64)
            y = np.bincount(bucket[side], clicks[side], 64)
            sides.append(
                VariantMetrics(
                    10.0,
                    float(n.sum()),
                    0.0,
                    {str(b): float(c) for b, c in enumerate(n)},
                    {str(b): float(c) for b, c in enumerate(y)},
                )
            )
        look = Look.at(steps, step, 0.95, sample_ratio_p_value=spec.sample_ratio_p_value)
        result = analyse(sides[0], sides[1], spec, look, earlier)
        if result.decision is AnalysisDecision.FAIL:
            return True
        earlier.append(StepMetrics(sides[0], sides[1]))
    return False


def test_an_identical_canary_stays_within_the_budget_over_the_whole_rollout() -> None:
    # The exact procedure (combined steps, group-sequential levels) on an A/A rollout:
    # at most 5%; 400 rollouts have a standard error of 1.1 points near 5%, so the bound
    # is 5% + 2.3 standard errors (a test that spent 5% at each cumulative look, about
    # 9-10% in all, would fail it most of the time).
    rng = np.random.default_rng(2026)
    trials = 400
    rolled_back = sum(simulated_rollout(rng, 0.0) for _ in range(trials))
    assert rolled_back / trials <= 0.05 + 2.3 * math.sqrt(0.05 * 0.95 / trials)


def test_a_canary_a_fifth_worse_is_caught() -> None:
    rng = np.random.default_rng(7)
    assert sum(simulated_rollout(rng, 0.2) for _ in range(40)) >= 38
