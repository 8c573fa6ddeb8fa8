"""Is one model better than another on the same users, or only on average by chance?

The retraining gate scores the candidate and the stable model on the same held-out
users. Comparing the two means alone ignores that the same users are hard or easy for
both models: per-user metrics vary far more between users than between models, so two
means a few per cent apart can be pure noise. The paired view takes, for every user
both models scored, the difference candidate − stable, and puts a 95% interval on the
mean difference. When that interval lies above 0 the candidate is better on these users
beyond what resampling them explains.

The interval is a percentile bootstrap over users (resampling users with replacement):
per-user ranking metrics are far from normal (mostly 0 or small values, a few large),
and the bootstrap does not assume a shape. It is seeded, so a verdict can be reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
"""Bootstrap resamples: the 2.5% and 97.5% percentiles move by well under 1% of the
interval's width between seeds at this count."""
SEED = 0
MAX_DRAWS_PER_BLOCK = 4_000_000
"""Resampled indices held in memory at once (32 MB), whatever the number of users."""


@dataclass(frozen=True)
class PairedDifference:
    users: int
    """Users scored by both models (the pairs)."""
    mean_difference: float
    """Mean over paired users of candidate − stable."""
    ci95_low: float
    ci95_high: float
    """95% bootstrap interval of `mean_difference`."""


def pair_by_user(
    candidate: np.ndarray,
    candidate_users: np.ndarray,
    stable: np.ndarray,
    stable_users: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(candidate values, stable values) of the users both were scored on, in one order.

    The two models need not have scored the same users: one that knows none of a user's
    history items leaves that user out of its evaluation."""
    common, in_candidate, in_stable = np.intersect1d(
        np.asarray(candidate_users), np.asarray(stable_users), return_indices=True
    )
    if len(common) == 0:
        raise ValueError("the two evaluations share no user: nothing to pair")
    return np.asarray(candidate, dtype=np.float64)[in_candidate], np.asarray(
        stable, dtype=np.float64
    )[in_stable]


def paired_difference(
    candidate: np.ndarray, stable: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED
) -> PairedDifference:
    """The mean of candidate − stable over paired rows, with its 95% bootstrap interval.

    `candidate[n]` and `stable[n]` are the same user's values (see `pair_by_user`)."""
    candidate = np.asarray(candidate, dtype=np.float64)
    stable = np.asarray(stable, dtype=np.float64)
    if candidate.shape != stable.shape or candidate.ndim != 1 or len(candidate) == 0:
        raise ValueError(
            f"paired values need two equal, non-empty rows; got {candidate.shape} and "
            f"{stable.shape}"
        )
    differences = candidate - stable
    means = _bootstrap_means(differences, resamples, np.random.default_rng(seed))
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedDifference(
        users=len(differences),
        mean_difference=float(differences.mean()),
        ci95_low=float(low),
        ci95_high=float(high),
    )


def _bootstrap_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `resamples` resamples of `values` with replacement, in bounded memory."""
    n = len(values)
    per_block = max(1, MAX_DRAWS_PER_BLOCK // n)
    means = np.empty(resamples)
    for start in range(0, resamples, per_block):
        count = min(per_block, resamples - start)
        means[start : start + count] = values[rng.integers(0, n, (count, n))].mean(axis=1)
    return means
