"""Sticky assignment: deterministic, monotone in the weight, reshuffled by the salt."""

from __future__ import annotations

import pytest

from recsys_contracts.variant_assignment import Variant, assign_variant, traffic_position

USERS = [f"user-{n}" for n in range(10_000)]


def canary_users(salt: str, weight: float) -> set[str]:
    return {u for u in USERS if assign_variant(salt, u, weight) is Variant.CANARY}


def test_positions_are_pinned_across_releases() -> None:
    # Every replica, of every gateway release, must put a user in the same place, or a
    # rolling update of the gateway would move users between variants mid-rollout.
    assert traffic_position("recs:2", "user-42") == pytest.approx(3.414799, abs=1e-6)
    assert traffic_position("recs:2", "user-43") == pytest.approx(2.524821, abs=1e-6)


def test_a_user_keeps_one_variant_for_a_weight() -> None:
    for user in USERS[:500]:
        first = assign_variant("recs:2", user, 30)
        assert all(assign_variant("recs:2", user, 30) is first for _ in range(3))


def test_weight_bounds() -> None:
    assert canary_users("recs:2", 0) == set()
    assert canary_users("recs:2", 100) == set(USERS)


def test_growing_the_weight_only_moves_users_into_the_canary() -> None:
    previous: set[str] = set()
    for weight in (1, 5, 10, 25, 50, 75, 99, 100):
        current = canary_users("recs:2", weight)
        assert previous <= current, f"users left the canary when the weight grew to {weight}"
        previous = current


@pytest.mark.parametrize("weight", [1, 5, 10, 25, 50, 90])
def test_observed_canary_share_matches_the_weight(weight: int) -> None:
    share = 100 * len(canary_users("recs:2", weight)) / len(USERS)
    # Binomial, n=10k: 4 standard deviations at p=0.5 is 2 points.
    assert share == pytest.approx(weight, abs=2.0)


def test_a_new_salt_reshuffles_who_is_in_the_canary() -> None:
    first = canary_users("recs:2", 20)
    second = canary_users("recs:3", 20)
    overlap = len(first & second) / len(first)
    # Independent draws overlap by about the weight (20 %), not 100 %.
    assert overlap == pytest.approx(0.20, abs=0.04)


def test_salt_and_user_do_not_run_into_each_other() -> None:
    assert traffic_position("ab", "c") != traffic_position("a", "bc")
