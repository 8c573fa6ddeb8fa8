"""The false-rollback budget spread over the analysed steps, by hand, and the
group-sequential levels of cumulative looks against an independent integration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys_operator.rollout.ratio_test import normal_cdf, normal_quantile
from recsys_operator.rollout.spending import (
    analysed_weights,
    cumulative_level,
    cumulative_levels,
    information_fractions,
    look_alpha,
    look_alphas,
)


def test_rho_1_spends_in_proportion_to_information() -> None:
    # w (1 - w): 0.09, 0.1875, 0.25 (sum 0.5275); alpha_k = 0.05 * info_k / 0.5275.
    alphas = look_alphas([10, 25, 50, 100], 0.05, rho=1)
    assert alphas == pytest.approx([0.0085308, 0.0177725, 0.0236967], abs=1e-7)
    assert sum(alphas) == pytest.approx(0.05)


def test_one_analysed_step_spends_everything() -> None:
    assert look_alphas([50, 100], 0.05) == pytest.approx([0.05])
    assert look_alphas([100], 0.05) == []


def test_the_default_exponent_saves_the_budget_for_later_looks() -> None:
    # rho = 2: t = 0.17062, 0.52607, 1 -> alpha t^2 = 0.0014555, 0.0138373, 0.05.
    alphas = look_alphas([10, 25, 50, 100], 0.05)
    assert alphas == pytest.approx([0.0014555, 0.0123818, 0.0361627], abs=1e-6)


def test_looks_past_the_plan_have_no_budget() -> None:
    assert look_alpha([10, 25, 50, 100], 3, 0.05) == 0.0
    assert analysed_weights([10, 25, 50, 100]) == [10, 25, 50]


# Cumulative looks: the group-sequential levels ----------------------------------------


def _second_look_crossing(first: float, second: float, t1: float) -> float:
    """P(Z_1 >= z_first, Z_2 < z_second) with corr(Z_1, Z_2) = sqrt(t1), integrated over
    Z_1 by the trapezoid rule: a different route from the module's recursion."""
    c1, c2, r = normal_quantile(first), normal_quantile(second), math.sqrt(t1)
    points, top = 20_000, 9.0
    h = (top - c1) / points
    total = 0.0
    for i in range(points + 1):
        z = c1 + i * h
        density = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        total += (
            (0.5 if i in (0, points) else 1.0)
            * density
            * normal_cdf((c2 - r * z) / math.sqrt(1 - r * r))
        )
    return total * h


def test_two_equal_looks_spend_half_the_budget_each() -> None:
    # Steps 50/50/100: equal information, t = 0.5, 1; alpha t (rho = 1) spends 0.025 at
    # each look. The second look's level is higher than 0.025 because the looks share
    # data (corr sqrt(0.5)); it is the level at which the second look adds exactly 0.025.
    first, second = cumulative_levels([50, 50, 100], 0.05, rho=1)
    assert information_fractions([50, 50, 100]) == pytest.approx([0.5, 1.0])
    assert first == pytest.approx(0.025)
    assert second == pytest.approx(0.035376, abs=2e-6)
    assert _second_look_crossing(first, second, 0.5) == pytest.approx(0.025, abs=1e-6)


def test_default_cumulative_levels_are_looser_than_the_union_bound() -> None:
    # rho = 2: union-bound shares 0.0014555, 0.0123818, 0.0361627 (above); the cumulative
    # looks' levels are 0.0014555, 0.012858, 0.043895.
    levels = cumulative_levels([10, 25, 50, 100], 0.05)
    assert levels == pytest.approx([0.0014555, 0.012858, 0.043895], abs=2e-6)
    shares = look_alphas([10, 25, 50, 100], 0.05)
    assert levels[0] == pytest.approx(shares[0])
    assert all(level > share for level, share in zip(levels[1:], shares[1:], strict=True))
    assert all(level < 0.05 for level in levels)
    assert cumulative_level([10, 25, 50, 100], 2, 0.05) == pytest.approx(levels[2])
    assert cumulative_level([10, 25, 50, 100], 3, 0.05) == 0.0


@pytest.mark.parametrize("rho", [1.0, 2.0, 3.0])
def test_the_levels_keep_the_whole_rollout_within_its_budget(rho: float) -> None:
    # Brownian motion in information time: Z_k = S(t_k) / sqrt(t_k). The share of paths
    # that ever cross a level is alpha, and look k adds alpha (t_k^rho - t_(k-1)^rho).
    t = np.array(information_fractions([10, 25, 50, 100]))
    levels = cumulative_levels([10, 25, 50, 100], 0.05, rho)
    rng = np.random.default_rng(7)
    paths = 400_000
    s = (rng.standard_normal((paths, 3)) * np.sqrt(np.diff(np.r_[0.0, t]))).cumsum(axis=1)
    rejects = s / np.sqrt(t) < np.array([normal_quantile(level) for level in levels])
    crossed = rejects.any(axis=1)
    first = rejects.argmax(axis=1)
    error = 3 * math.sqrt(0.05 * 0.95 / paths)  # three standard errors of the simulation
    assert crossed.mean() == pytest.approx(0.05, abs=error)
    spent = [float((crossed & (first == k)).mean()) for k in range(3)]
    assert spent == pytest.approx(np.diff(np.r_[0.0, 0.05 * t**rho]), abs=error)
