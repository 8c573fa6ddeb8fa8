"""Table-driven cases of the canary analysis: data problems are never a pass; the
rates are judged with the bucket variance at this look's share of the budget."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from recsys_operator.api.recommender_system import AnalysisSpec
from recsys_operator.api.status import AnalysisDecision
from recsys_operator.rollout.analysis import (
    Look,
    VariantMetrics,
    analyse,
    counter_increase,
)

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
    # first look of the default plan (alpha 0.0085): the first look keeps budget for later.
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
    assert first_alpha == pytest.approx(0.0085308, abs=1e-6)
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
