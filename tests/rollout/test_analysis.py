"""Table-driven cases of the canary analysis: data problems are never a pass."""

from __future__ import annotations

import math

import pytest

from recsys_operator.api.recommender_system import AnalysisSpec
from recsys_operator.api.status import AnalysisDecision
from recsys_operator.rollout.analysis import VariantMetrics, analyse, counter_increase, ctr_p_value

SPEC = AnalysisSpec(
    max_p99_latency_ms=50,
    max_error_rate=0.01,
    min_ctr_ratio=0.95,
    min_impressions=1000,
    confidence=0.95,
)
NAN = float("nan")


def v(
    p99: float | None = 20.0,
    requests: float | None = 5000,
    errors: float | None = 0,
    impressions: float | None = 5000,
    clicks: float | None = 500,
) -> VariantMetrics:
    return VariantMetrics(p99, requests, errors, impressions, clicks)


CASES = [
    ("healthy canary, same CTR", v(), v(), AnalysisDecision.PASS, "p99 20.0 ms"),
    (
        "canary CTR clearly lower",
        v(clicks=300),
        v(clicks=500),
        AnalysisDecision.FAIL,
        "significantly below",
    ),
    (
        "canary CTR a bit lower, not significant",
        v(clicks=470, impressions=5000),
        v(clicks=500),
        AnalysisDecision.PASS,
        "p=",
    ),
    ("canary CTR higher", v(clicks=700), v(clicks=500), AnalysisDecision.PASS, "canary CTR 0.1400"),
    (
        "latency over threshold",
        v(p99=80.0),
        v(),
        AnalysisDecision.FAIL,
        "p99 latency 80.0 ms exceeds 50 ms",
    ),
    (
        "error rate over threshold",
        v(errors=100),
        v(),
        AnalysisDecision.FAIL,
        "error rate 0.0200 exceeds",
    ),
    (
        # Serving failed, the gateway answered from the fallback: no impressions of its own.
        "every canary request fell back",
        v(p99=None, errors=5000, impressions=None, clicks=None),
        v(),
        AnalysisDecision.FAIL,
        "error rate 1.0000 exceeds",
    ),
    (
        "NaN latency (empty histogram)",
        v(p99=NAN),
        v(),
        AnalysisDecision.INCONCLUSIVE,
        "canary p99 latency",
    ),
    (
        "empty vector for canary impressions",
        v(impressions=None),
        v(),
        AnalysisDecision.INCONCLUSIVE,
        "canary impressions",
    ),
    (
        "Prometheus down: nothing at all",
        v(None, None, None, None, None),
        v(None, None, None, None, None),
        AnalysisDecision.INCONCLUSIVE,
        "no data",
    ),
    (
        "zero impressions",
        v(impressions=0, clicks=0),
        v(),
        AnalysisDecision.WAIT,
        "too few impressions",
    ),
    (
        "too few stable impressions",
        v(),
        v(impressions=10, clicks=1),
        AnalysisDecision.WAIT,
        "stable 10",
    ),
    (
        "infinite latency treated as missing",
        v(p99=math.inf),
        v(),
        AnalysisDecision.INCONCLUSIVE,
        "no data",
    ),
    (
        "no clicks anywhere: equal, not worse",
        v(clicks=0),
        v(clicks=0),
        AnalysisDecision.PASS,
        "canary CTR 0.0000",
    ),
    (
        "canary no clicks, stable clicks",
        v(clicks=0),
        v(clicks=500),
        AnalysisDecision.FAIL,
        "significantly below",
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
    result = analyse(canary, stable, SPEC)
    assert result.decision is decision, result.reason
    assert phrase in result.reason


def test_failed_ctr_records_the_numbers() -> None:
    result = analyse(v(clicks=300), v(clicks=500), SPEC)
    assert result.canary_ctr == pytest.approx(0.06)
    assert result.stable_ctr == pytest.approx(0.10)
    assert result.canary_impressions == 5000 and result.stable_impressions == 5000
    assert result.p_value is not None and result.p_value < 0.05


def test_p_value_matches_a_hand_computed_z_test() -> None:
    # p_c = 0.09, p_s = 0.10, r = 1: z = -0.01 / sqrt(.09*.91/10000 + .1*.9/10000) = -2.4126
    p = ctr_p_value(900, 10_000, 1000, 10_000, 1.0)
    assert p == pytest.approx(0.00792, abs=2e-4)


def test_p_value_is_monotone_in_canary_clicks() -> None:
    ps = [ctr_p_value(c, 5000, 500, 5000, 0.95) for c in range(300, 700, 50)]
    assert ps == sorted(ps)


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
