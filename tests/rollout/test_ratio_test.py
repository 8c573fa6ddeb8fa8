"""The cluster-robust rate comparison, the sample-ratio check and the sizing, on cases
computed by hand, plus one simulation that checks the variance is the real one."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys_operator.rollout.ratio_test import (
    RatioComparison,
    Stratum,
    compare_rates,
    compare_strata,
    normal_cdf,
    normal_quantile,
    sample_ratio,
    student_t_cdf,
)


def test_two_buckets_by_hand() -> None:
    # p_c = 3/10 = 0.3, p_s = 4/10 = 0.4, r = 0.8: D = 0.3 - 0.32 = -0.02.
    # Rates at the threshold: q_s = (3 + 4) / (0.8*10 + 10) = 0.388889, q_c = 0.311111.
    # e_a = (2 - 0.311111*4)/10 - 0.8 (1 - 0.388889*5)/10 = 0.075556 + 0.075556 = 0.151111
    # e_b = (1 - 0.311111*6)/10 - 0.8 (3 - 0.388889*5)/10 = -0.086667 - 0.084444 = -0.171111
    # Var = 2/1 * (0.151111^2 + 0.171111^2) = 0.104227, se = 0.322843; t = D / se with
    # 2 - 1 = 1 degree of freedom (Cauchy): p = 1/2 + atan(t) / pi.
    c = compare_rates({"a": 2, "b": 1}, {"a": 4, "b": 6}, {"a": 1, "b": 3}, {"a": 5, "b": 5}, 0.8)
    assert c.canary_rate == pytest.approx(0.3) and c.stable_rate == pytest.approx(0.4)
    assert c.difference == pytest.approx(-0.02)
    assert c.std_error == pytest.approx(0.322843, abs=1e-6)
    assert c.p_value == pytest.approx(0.5 + math.atan(-0.02 / 0.322843) / math.pi, abs=1e-6)
    assert c.p_value == pytest.approx(0.48031, abs=1e-5)
    assert c.buckets == 2 and c.impressions == 20


def test_users_who_differ_widen_the_error_beyond_the_binomial_one() -> None:
    # Same totals (6 clicks in 20 impressions on each side), but on the canary one
    # bucket of users clicks 5 of 10 and the other 1 of 10.
    # e_a = (5 - 3)/20 = 0.1, e_b = -0.1: Var = 2 * 0.02 = 0.04, se = 0.2;
    # the binomial se would be sqrt(2 * 0.21 / 20) = 0.145.
    c = compare_rates({"a": 5, "b": 1}, {"a": 10, "b": 10}, {"a": 3, "b": 3}, {"a": 10, "b": 10}, 1)
    assert c.std_error == pytest.approx(0.2)
    assert c.p_value == pytest.approx(0.5)


def test_a_missing_bucket_counts_zero_and_empty_sides_are_refused() -> None:
    with_gap = compare_rates({"a": 1}, {"a": 4, "b": 6}, {"b": 2}, {"a": 5, "b": 5}, 1.0)
    explicit = compare_rates(
        {"a": 1, "b": 0}, {"a": 4, "b": 6}, {"a": 0, "b": 2}, {"a": 5, "b": 5}, 1.0
    )
    assert with_gap == explicit
    with pytest.raises(ValueError, match="impressions on both"):
        compare_rates({}, {}, {"a": 1}, {"a": 5}, 1.0)


def test_the_variance_is_taken_at_the_threshold() -> None:
    # Buckets alike on each side, canary at half of stable. The observed rates would give
    # no spread at all (se 0, "certain"); at the threshold (q = 4/40 = 0.1 on both sides)
    # e_a = e_b = (1 - 1)/20 - (2 - 1)/20 = -0.05: Var = 2 * 0.005 = 0.01, se = 0.1,
    # t = -0.1 / 0.1 = -1 with 1 degree of freedom: p = 1/4.
    same = {"a": 10.0, "b": 10.0}
    worse = compare_rates({"a": 1, "b": 1}, same, {"a": 2, "b": 2}, same, 1.0)
    assert worse.std_error == pytest.approx(0.1)
    assert worse.p_value == pytest.approx(0.25)


def test_no_clicks_anywhere_is_no_evidence() -> None:
    same = {"a": 10.0, "b": 10.0}
    nothing = compare_rates({}, same, {}, same, 1.0)
    assert nothing.std_error == 0 and nothing.p_value == 1.0


def simulate(rng: np.random.Generator, users: int, concentration: float, ratio: float) -> tuple:
    """One window: users with Beta click propensities (mean 0.35), Poisson(7)
    impressions, half of them on the canary (whose propensities are x ratio)."""
    a = 0.35 * concentration
    propensity = rng.beta(a, concentration - a, users)
    impressions = rng.poisson(7, users)
    canary = rng.random(users) < 0.5
    clicks = rng.binomial(impressions, np.where(canary, propensity * ratio, propensity))
    bucket = np.arange(users) % 64
    out = []
    for side in (canary, ~canary):
        n = np.bincount(bucket[side], impressions[side], 64)
        y = np.bincount(bucket[side], clicks[side], 64)
        out += [dict(enumerate(y)), dict(enumerate(n))]
    return tuple({str(k): float(v) for k, v in d.items()} for d in out)


def test_the_bucket_variance_matches_the_spread_across_repeated_windows() -> None:
    # With realistic spread between users (concentration 2) the impressions of one user
    # are far from independent: the binomial error is about 1.8x too small. The
    # bucket-based error must match the real spread of the difference.
    rng = np.random.default_rng(5)
    differences, errors, binomial = [], [], []
    for _ in range(400):
        y_c, n_c, y_s, n_s = simulate(rng, 2000, 2.0, 1.0)
        c = compare_rates(y_c, n_c, y_s, n_s, 1.0)
        differences.append(c.difference)
        errors.append(c.std_error)
        nc, ns = sum(n_c.values()), sum(n_s.values())
        binomial.append(
            math.sqrt(
                c.canary_rate * (1 - c.canary_rate) / nc + c.stable_rate * (1 - c.stable_rate) / ns
            )
        )
    real = float(np.std(differences))
    assert float(np.mean(errors)) == pytest.approx(real, rel=0.1)
    assert float(np.mean(binomial)) < 0.7 * real


def test_sample_ratio_by_hand() -> None:
    # share = 40/200 = 0.2; e_a = (30 - 0.2*100)/200 = 0.05, e_b = -0.05:
    # Var = 2 * 0.005 = 0.01; chi-square = (0.2 - 0.25)^2 / 0.01 = 0.25; with Student's t
    # on 2 - 1 = 1 degree of freedom (Cauchy), p = 2 P(T <= -0.5) = 1 - 2 atan(0.5) / pi.
    s = sample_ratio({"a": 30, "b": 10}, {"a": 70, "b": 90}, 0.25)
    assert s.canary_share == pytest.approx(0.2)
    assert s.chi_square == pytest.approx(0.25)
    assert s.p_value == pytest.approx(1 - 2 * math.atan(0.5) / math.pi, abs=1e-12)
    assert s.p_value == pytest.approx(0.70483, abs=1e-5)


def test_sample_ratio_flags_a_real_mismatch_and_not_clumpy_users() -> None:
    rng = np.random.default_rng(9)
    # Right assignment, clumpy users: rarely flagged at 0.001.
    flagged = 0
    for _ in range(200):
        _, n_c, _, n_s = simulate(rng, 2000, 0.5, 1.0)
        flagged += sample_ratio(n_c, n_s, 0.5).p_value < 0.001
    assert flagged <= 2
    # 45% of impressions where 50% were configured, at 14,000 impressions: flagged.
    _, n_c, _, n_s = simulate(rng, 2000, 2.0, 1.0)
    moved = {b: n_c[b] * 0.9 for b in n_c}
    stable = {b: n_s[b] + n_c[b] * 0.1 for b in n_s}
    assert sample_ratio(moved, stable, 0.5).p_value < 1e-4


@pytest.mark.parametrize(
    ("p", "z"),
    [(0.5, 0.0), (0.8, 0.8416212), (0.95, 1.6448536), (0.975, 1.9599640), (1e-6, -4.7534243)],
)
def test_normal_quantile(p: float, z: float) -> None:
    assert normal_quantile(p) == pytest.approx(z, abs=1e-6)
    assert normal_cdf(normal_quantile(p)) == pytest.approx(p, rel=1e-9)


@pytest.mark.parametrize(
    ("t", "df", "cdf"),
    [
        (-1.0, 1, 0.25),  # Cauchy: 1/2 + atan(t) / pi
        (1.0, 2, 0.5 + 1 / (2 * math.sqrt(3))),  # 1/2 + t / (2 sqrt(2 + t^2))
        (0.0, 63, 0.5),
        # 1/2 + 3/8 u (1 - t^2 / (12 (1 + t^2/4))), u = t / sqrt(1 + t^2/4)
        (-2.0, 4, 0.5 + 3 / 8 * (-2 / math.sqrt(2)) * (1 - 4 / 24)),
    ],
)
def test_student_t_cdf_closed_forms(t: float, df: int, cdf: float) -> None:
    assert student_t_cdf(t, df) == pytest.approx(cdf, abs=1e-12)


def test_student_t_tends_to_the_normal() -> None:
    assert student_t_cdf(-2.0, 100_000) == pytest.approx(normal_cdf(-2.0), abs=2e-6)
    # ... and its tails are heavier at the analysis's 63 degrees of freedom.
    assert student_t_cdf(-2.38, 63) > 1.15 * normal_cdf(-2.38)


def test_impressions_needed_by_hand() -> None:
    # se 0.01 at 10,000 impressions, stable CTR 0.3, threshold 1.0, a 10% drop:
    # delta = 0.03, z = 1.6448536 + 0.8416212 = 2.4864748,
    # n* = 10,000 * 0.01^2 * (2.4864748 / 0.03)^2 = 6,869.5.
    c = RatioComparison(0.3, 0.3, 1.0, 0.01, 64, 10_000)
    assert c.impressions_needed(0.10, 0.05, 0.8) == pytest.approx(6869.5, abs=0.5)
    # A drop that does not reach below the threshold can never be detected.
    assert math.isinf(
        RatioComparison(0.3, 0.3, 0.9, 0.01, 64, 10_000).impressions_needed(0.1, 0.05, 0.8)
    )


def test_two_steps_combined_by_hand() -> None:
    # r = 1. Step A: canary a 5/10, b 3/10; stable a 4/10, b 4/10. q = 16/40 = 0.4,
    #   e_a = (5 - 4)/20 - 0 = 0.05, e_b = -0.05, V_A = 2 (0.05^2 + 0.05^2) = 0.01, D_A = 0.
    # Step B: canary a 2/10, b 2/10; stable a 9/30, b 15/30. q = 28/80 = 0.35,
    #   e_a = (2 - 3.5)/20 - (9 - 10.5)/60 = -0.05, e_b = -0.075 - 0.075 = -0.15,
    #   V_B = 2 (0.05^2 + 0.15^2) = 0.05, D_B = 0.2 - 0.4 = -0.2.
    # Weights 1/V: 100 and 20 -> 5/6, 1/6. D = -0.2/6 = -0.033333.
    # Combined e_a = (5 0.05 - 0.05)/6 = 0.033333, e_b = (-5 0.05 - 0.15)/6 = -0.066667,
    # Var = 2 (0.033333^2 + 0.066667^2) = 0.011111: more than 1 / (100 + 20) = 0.008333,
    # because bucket b is below at both steps (the same users), which independence ignores.
    step_a = Stratum({"a": 5, "b": 3}, {"a": 10, "b": 10}, {"a": 4, "b": 4}, {"a": 10, "b": 10})
    step_b = Stratum({"a": 2, "b": 2}, {"a": 10, "b": 10}, {"a": 9, "b": 15}, {"a": 30, "b": 30})
    c = compare_strata([step_a, step_b], 1.0)
    assert c.difference == pytest.approx(-0.033333, abs=1e-6)
    assert c.canary_rate == pytest.approx(0.366667, abs=1e-6)
    assert c.stable_rate == pytest.approx(0.4)
    assert c.std_error == pytest.approx(math.sqrt(0.011111), abs=1e-6)
    assert c.buckets == 2 and c.impressions == 120
    # One step is the plain comparison.
    single = compare_strata([step_b], 1.0)
    plain = compare_rates(*(getattr(step_b, f) for f in step_b.__dataclass_fields__), 1.0)
    assert single == plain
    with pytest.raises(ValueError):
        compare_strata([], 1.0)


def test_steps_are_compared_within_themselves_so_a_drift_is_no_effect() -> None:
    # CTR falls from 0.5 to 0.2 between steps while the canary's weight rises from 10%
    # to 50%: pooled over both steps the canary looks far worse (most of its impressions
    # come from the later, lower step: Simpson's paradox). Within each step the canary
    # equals stable, and so does the stratified comparison.
    def step(canary_n: int, stable_n: int, ctr: float) -> Stratum:
        y_c, n_c, y_s, n_s = {}, {}, {}, {}
        for b in range(32):
            bucket_ctr = ctr + (0.1 if b % 2 else -0.1)  # users differ by bucket
            n_c[str(b)], n_s[str(b)] = canary_n, stable_n
            y_c[str(b)], y_s[str(b)] = bucket_ctr * canary_n, bucket_ctr * stable_n
        return Stratum(y_c, n_c, y_s, n_s)

    early, late = step(10, 90, 0.5), step(50, 50, 0.2)
    stratified = compare_strata([early, late], 1.0)
    assert stratified.difference == pytest.approx(0.0, abs=1e-12)
    assert stratified.p_value >= 0.5  # no evidence of a drop at all

    def pooled(field: str) -> dict[str, float]:
        return {
            b: getattr(early, field)[b] + getattr(late, field)[b] for b in early.canary_impressions
        }

    naive = compare_rates(*(pooled(f) for f in early.__dataclass_fields__), 1.0)
    assert naive.canary_rate < 0.8 * naive.stable_rate and naive.p_value < 1e-4
