"""The false-rollback budget spread over the analysed steps, by hand."""

from __future__ import annotations

import pytest

from recsys_operator.rollout.spending import analysed_weights, look_alpha, look_alphas


def test_default_steps_spend_in_proportion_to_information() -> None:
    # w (1 - w): 0.09, 0.1875, 0.25 (sum 0.5275); alpha_k = 0.05 * info_k / 0.5275.
    alphas = look_alphas([10, 25, 50, 100], 0.05)
    assert alphas == pytest.approx([0.0085308, 0.0177725, 0.0236967], abs=1e-7)
    assert sum(alphas) == pytest.approx(0.05)


def test_one_analysed_step_spends_everything() -> None:
    assert look_alphas([50, 100], 0.05) == pytest.approx([0.05])
    assert look_alphas([100], 0.05) == []


def test_a_steeper_exponent_saves_the_budget_for_later_looks() -> None:
    # rho = 2: t = 0.17062, 0.52607, 1 -> alpha t^2 = 0.0014555, 0.0138373, 0.05.
    alphas = look_alphas([10, 25, 50, 100], 0.05, rho=2)
    assert alphas == pytest.approx([0.0014555, 0.0123818, 0.0361627], abs=1e-6)


def test_looks_past_the_plan_have_no_budget() -> None:
    assert look_alpha([10, 25, 50, 100], 3, 0.05) == 0.0
    assert analysed_weights([10, 25, 50, 100]) == [10, 25, 50]
