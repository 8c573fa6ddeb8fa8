"""The gate's paired comparison: a candidate must be better on the same users, not only on average.

Per-user metrics vary much more between users than between two models. The held-out
slices here are made so that the means differ by more than the margin asked in both
cases; only the per-user differences tell a real gain from noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from model_handlers.continuous_training import Gate, judge
from model_handlers.evaluation import Evaluation
from model_handlers.paired_comparison import pair_by_user, paired_difference
from recsys_contracts.training_report import GateResult

GATE = Gate(metric="ndcg@10", min_relative_improvement=0.02, min_users=100)
USERS = 400


def _evaluation(values: np.ndarray, users: np.ndarray) -> Evaluation:
    return Evaluation(
        users=len(values),
        metrics={"ndcg@10": float(values.mean())},
        ci95={"ndcg@10": float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))},
        per_user={"ndcg@10": values},
        user_keys=users,
    )


def _stable(rng: np.random.Generator) -> np.ndarray:
    # Ranking metrics per user: many zeros (nothing found), the rest spread out.
    return np.where(np.arange(USERS) % 2 == 0, 0.0, rng.uniform(0.2, 0.8, USERS))


def test_a_candidate_better_on_average_only_through_noise_is_gated_out() -> None:
    rng = np.random.default_rng(1)
    stable = _stable(rng)
    # On the users the stable finds something for, the candidate gains 0.162 on one half
    # and loses 0.138 on the other, at random: its mean is 2.4% higher than the stable's,
    # more than the 2% margin, but the paired differences are centred near 0 with a
    # wide spread.
    found = np.flatnonzero(stable > 0)
    swing = np.where(rng.permutation(len(found)) % 2 == 0, 0.15, -0.15)
    candidate = stable.copy()
    candidate[found] += swing + 0.012
    users = np.array([f"u{n}" for n in range(USERS)], dtype=object)
    judgement = judge(_evaluation(candidate, users), _evaluation(stable, users), GATE, "1")
    assert judgement.relative_improvement is not None
    assert judgement.relative_improvement >= GATE.min_relative_improvement  # the means alone pass
    assert judgement.result is GateResult.GATED_OUT, judgement.reason
    assert judgement.paired.ci95_low <= 0 < judgement.paired.ci95_high
    assert judgement.paired.users == USERS
    assert "may be noise" in judgement.reason and "95% CI" in judgement.reason


def test_a_clearly_better_candidate_passes_with_its_paired_interval_above_zero() -> None:
    rng = np.random.default_rng(1)
    stable = _stable(rng)
    # The same spread between users, but the candidate gains on almost every user.
    candidate = np.clip(stable + rng.normal(0.03, 0.02, USERS), 0.0, 1.0)
    assert (candidate - stable).mean() < 0.04  # not a larger mean than the noisy one's by much
    users = np.array([f"u{n}" for n in range(USERS)], dtype=object)
    judgement = judge(_evaluation(candidate, users), _evaluation(stable, users), GATE, "1")
    assert judgement.result is GateResult.PASSED, judgement.reason
    assert 0 < judgement.paired.ci95_low < judgement.paired.mean_difference
    assert judgement.paired.mean_difference < judgement.paired.ci95_high


def test_the_margin_still_applies_when_the_paired_interval_is_above_zero() -> None:
    rng = np.random.default_rng(1)
    stable = _stable(rng) + 0.4  # a high stable: +0.01 per user is under 2%
    candidate = stable + 0.01 + rng.normal(0, 0.001, USERS)
    users = np.array([f"u{n}" for n in range(USERS)], dtype=object)
    judgement = judge(_evaluation(candidate, users), _evaluation(stable, users), GATE, "1")
    assert judgement.paired.ci95_low > 0
    assert judgement.result is GateResult.GATED_OUT, judgement.reason


def test_users_are_paired_by_id_whatever_their_order_and_only_when_both_scored_them() -> None:
    candidate_users = np.array(["a", "b", "c", "d"], dtype=object)
    stable_users = np.array(["d", "b", "a"], dtype=object)  # "c" unknown to the stable
    candidate, stable = pair_by_user(
        np.array([0.4, 0.3, 0.9, 0.1]), candidate_users, np.array([0.0, 0.2, 0.5]), stable_users
    )
    assert candidate.tolist() == [0.4, 0.3, 0.1] and stable.tolist() == [0.5, 0.2, 0.0]
    with pytest.raises(ValueError, match="share no user"):
        pair_by_user(np.array([1.0]), np.array(["x"]), np.array([1.0]), np.array(["y"]))


def test_the_bootstrap_interval_matches_the_normal_one_on_many_users() -> None:
    rng = np.random.default_rng(2)
    differences = rng.normal(0.05, 0.3, 5000)
    result = paired_difference(differences, np.zeros_like(differences))
    half = 1.96 * differences.std(ddof=1) / np.sqrt(len(differences))
    assert result.mean_difference == pytest.approx(differences.mean())
    assert result.ci95_low == pytest.approx(differences.mean() - half, abs=half * 0.1)
    assert result.ci95_high == pytest.approx(differences.mean() + half, abs=half * 0.1)
