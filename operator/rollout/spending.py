"""How a rollout spends its false-rollback budget over its analysed steps.

A rollout analyses the canary once per step before 100% (three times with the default
steps 10/25/50/100). Testing each look at 1 - confidence would roll back a good canary
up to three times as often as asked. Instead the budget alpha = 1 - confidence is split
over the looks in advance, alpha_1 + ... + alpha_K = alpha, so by the union bound

    P(any look rolls back a canary that meets the threshold) <= sum_k alpha_k = alpha,

whatever the dependence between looks. The split follows each look's information,
fixed by the spec alone (never by the data, which would void the bound): a step at
weight w compares w and 1 - w of the same traffic, so the variance of its comparison
is proportional to 1 / (w (1 - w)) and its information to w (1 - w). With the
cumulative information fraction t_k, look k spends alpha (t_k^rho - t_{k-1}^rho), the
power family of Kim and DeMets; rho = 1 spends in proportion to information.

A look at which several metrics are tested (CTR and the guardrails) divides its
alpha_k equally among them, for the same union-bound reason.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from recsys_operator.rollout.ratio_test import normal_quantile

SPENDING_EXPONENT = 2.0
"""rho of the power family: 1 spends in proportion to information, larger values save
the budget for the later looks, which combine the most data (docs/rollout-analysis.md)."""


def analysed_weights(steps: Sequence[int]) -> list[int]:
    """The weights at which the canary is analysed: every step before the one at 100%
    (passing the step before 100% promotes)."""
    return [w for w in steps if w < 100]


def look_alphas(steps: Sequence[int], alpha: float, rho: float = SPENDING_EXPONENT) -> list[float]:
    """alpha_k for each analysed step, in order; they sum to `alpha`."""
    weights = analysed_weights(steps)
    information = [w / 100 * (1 - w / 100) for w in weights]
    total = sum(information)
    alphas, spent, cumulative = [], 0.0, 0.0
    for info in information:
        cumulative += info
        target = alpha * (cumulative / total) ** rho
        alphas.append(target - spent)
        spent = target
    return alphas


def look_alpha(steps: Sequence[int], step: int, alpha: float) -> float:
    """alpha_k of the step at index `step` of `steps` (an index past the plan gets 0:
    no budget is left, so nothing more can be rolled back on significance)."""
    alphas = look_alphas(steps, alpha)
    return alphas[step] if 0 <= step < len(alphas) else 0.0


# Cumulative looks: group-sequential boundaries ---------------------------------------
#
# When every look tests all the data since the canary started (the steps combined),
# the looks' statistics are strongly correlated, and the union bound above wastes
# budget: three looks at 0.0085/0.0178/0.0237 reject a canary on the threshold far
# less often than 5% in total. The boundaries below spend exactly alpha (t_k) - alpha
# (t_{k-1}) at look k for the joint law of the cumulative z statistics.
#
# With information I_k accumulated by look k (t_k = I_k / I_K), the cumulative
# statistic Z_k = S_k / sqrt(t_k), where S is a Brownian motion in information time:
# independent increments S_k - S_{k-1} ~ N(0, t_k - t_{k-1}) under the null, so
# corr(Z_j, Z_k) = sqrt(t_j / t_k). Look k rejects when Z_k < -c_k; c_1 = z_{1-alpha(t_1)},
# and c_k solves
#
#     P(Z_1 >= -c_1, ..., Z_{k-1} >= -c_{k-1}, Z_k < -c_k) = alpha(t_k) - alpha(t_{k-1}),
#
# computed by recursive numerical integration of the density of S_k on the continuation
# region (Armitage, McPherson and Rowe 1969; Jennison and Turnbull 2000, ch. 19).
# The nominal one-sided level of look k is Phi(-c_k).

_GRID_POINTS = 4001
_GRID_SPAN = 9.0
"""Standard deviations of S_k the grid reaches above the boundary (the rest is < 1e-18)."""


def information_fractions(steps: Sequence[int]) -> list[float]:
    """t_k of each analysed step: cumulative w (1 - w), divided by the total.

    A step at weight w compares w and 1 - w of one interval's traffic, so its
    information is proportional to w (1 - w); each step lasts one interval in the plan."""
    information = [w / 100 * (1 - w / 100) for w in analysed_weights(steps)]
    total = sum(information)
    fractions, cumulative = [], 0.0
    for info in information:
        cumulative += info
        fractions.append(cumulative / total)
    return fractions


def _normal_pdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))


_erf = np.vectorize(math.erf, otypes=[float])


def _simpson_weights(points: int, spacing: float) -> np.ndarray:
    weights = np.ones(points)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return weights * spacing / 3.0


def _crossing(level: float, t: float, sd: float, grid: np.ndarray, weights: np.ndarray) -> float:
    """P(continued to look k - 1, then Z_k below the level): the density of S_(k-1) on
    `grid` (times its quadrature `weights`) carried over an increment N(0, sd^2)."""
    edge = normal_quantile(level) * math.sqrt(t)
    return float(weights @ _normal_cdf((edge - grid) / sd))


def cumulative_levels(
    steps: Sequence[int], alpha: float, rho: float = SPENDING_EXPONENT
) -> list[float]:
    """Nominal one-sided level of each cumulative look, spending alpha t^rho in total.

    Each is at least the union-bound share (`look_alphas`) of the same look, and the
    first is equal to it; the probability that any look rejects, for z statistics with
    corr(Z_j, Z_k) = sqrt(t_j / t_k), is alpha."""
    fractions = information_fractions(steps)
    if not fractions:
        return []
    spend = [alpha * t**rho for t in fractions]
    first = spend[0]
    levels = [first]
    bound = normal_quantile(first)  # S_1 / sqrt(t_1) below this rejects
    t_prev = fractions[0]
    # Density of S_1 on its continuation region [bound sqrt(t_1), inf).
    low = bound * math.sqrt(t_prev)
    grid = np.linspace(low, low + _GRID_SPAN * math.sqrt(t_prev), _GRID_POINTS)
    density = _normal_pdf(grid / math.sqrt(t_prev)) / math.sqrt(t_prev)
    for k in range(1, len(fractions)):
        t = fractions[k]
        spacing = grid[1] - grid[0]
        weights = _simpson_weights(len(grid), spacing) * density
        sd = math.sqrt(t - t_prev)
        target = spend[k] - spend[k - 1]

        # The level at which look k alone spends the increment: bisect on the level's log.
        lo, hi = math.log(max(target, 1e-12)), math.log(0.5)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if _crossing(math.exp(mid), t, sd, grid, weights) < target:
                lo = mid
            else:
                hi = mid
        level = math.exp(0.5 * (lo + hi))
        levels.append(level)
        if k + 1 < len(fractions):  # the density of S_k on its continuation region
            low = normal_quantile(level) * math.sqrt(t)
            new_grid = np.linspace(low, low + _GRID_SPAN * math.sqrt(t), _GRID_POINTS)
            kernel = _normal_pdf((new_grid[:, None] - grid[None, :]) / sd) / sd
            density = kernel @ weights
            grid, t_prev = new_grid, t
    return levels


@functools.lru_cache(maxsize=64)
def _cached_levels(steps: tuple[int, ...], alpha: float, rho: float) -> tuple[float, ...]:
    return tuple(cumulative_levels(steps, alpha, rho))


def cumulative_level(steps: Sequence[int], step: int, alpha: float) -> float:
    """The nominal level of the cumulative look at index `step` (0 past the plan)."""
    levels = _cached_levels(tuple(steps), alpha, SPENDING_EXPONENT)
    return levels[step] if 0 <= step < len(levels) else 0.0
