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

from collections.abc import Sequence

SPENDING_EXPONENT = 1.0
"""rho of the power family: 1 spends in proportion to information."""


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
