"""PSI and KS of two bucketed distributions, as the drift trigger reads them from
Prometheus histograms: hand-computed values, scipy's two-sample KS, and the edge cases
(empty buckets, dipping cumulative counts, mismatched buckets)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp

from recsys_contracts.metric_names import SERVED_SCORE_BUCKETS
from recsys_operator.retraining.drift import (
    EPSILON,
    Distributions,
    DriftInputError,
    bucket_counts,
    ks,
    psi,
)


def cumulative(
    samples: np.ndarray, bounds: tuple[float, ...] = SERVED_SCORE_BUCKETS
) -> dict[str, float]:
    """`le` -> cumulative count, as `increase(x_bucket[w])` gives them for these samples."""
    found = {f"{b}": float(np.sum(samples <= b)) for b in bounds}
    found["+Inf"] = float(len(samples))
    return found


def test_hand_computed_psi_and_ks() -> None:
    # Recent: half the answers at or below 0.5; reference: a quarter.
    shares = Distributions.of({"0.5": 50, "+Inf": 100}, {"0.5": 25, "+Inf": 100})
    assert shares.recent == [0.5, 0.5] and shares.reference == [0.25, 0.75]
    # (0.5 - 0.25) ln(0.5/0.25) + (0.5 - 0.75) ln(0.5/0.75) = 0.173287 + 0.101366
    assert psi(shares.recent, shares.reference) == pytest.approx(0.274653, abs=1e-6)
    assert ks(shares.recent, shares.reference) == pytest.approx(0.25)


def test_equal_distributions_have_no_drift_whatever_the_totals() -> None:
    shares = Distributions.of(
        {"0.2": 10, "0.7": 30, "+Inf": 40}, {"0.2": 250, "0.7": 750, "+Inf": 1000}
    )
    assert psi(shares.recent, shares.reference) == pytest.approx(0.0, abs=1e-12)
    assert ks(shares.recent, shares.reference) == pytest.approx(0.0, abs=1e-12)


def test_ks_equals_scipy_on_samples_rounded_to_their_bucket_bound() -> None:
    rng = np.random.default_rng(5)
    recent = np.clip(rng.normal(0.55, 0.12, 4000), -1, 1)
    reference = np.clip(rng.normal(0.62, 0.10, 6000), -1, 1)
    shares = Distributions.of(cumulative(recent), cumulative(reference))
    bounds = np.array(SERVED_SCORE_BUCKETS)
    rounded = [bounds[np.searchsorted(bounds, s)] for s in (recent, reference)]
    expected = ks_2samp(*rounded).statistic
    assert ks(shares.recent, shares.reference) == pytest.approx(expected, abs=1e-12)
    # Bucketing only loses resolution: the exact statistic is at least as large.
    assert ks_2samp(recent, reference).statistic >= expected - 1e-12


def test_psi_matches_the_textbook_formula_on_histograms() -> None:
    rng = np.random.default_rng(6)
    recent, reference = rng.beta(5, 3, 3000), rng.beta(4, 3, 3000)
    shares = Distributions.of(cumulative(recent), cumulative(reference))
    edges = [-np.inf, *SERVED_SCORE_BUCKETS, np.inf]
    p = np.histogram(recent, edges)[0] / len(recent)
    q = np.histogram(reference, edges)[0] / len(reference)
    p, q = np.maximum(p, EPSILON), np.maximum(q, EPSILON)
    assert psi(shares.recent, shares.reference) == pytest.approx(
        float(np.sum((p - q) * np.log(p / q)))
    )


def test_an_empty_bucket_on_one_side_gives_a_large_finite_psi() -> None:
    shares = Distributions.of({"0.5": 0, "+Inf": 100}, {"0.5": 50, "+Inf": 100})
    value = psi(shares.recent, shares.reference)
    # (1e-4 - 0.5) ln(1e-4 / 0.5) + (1 - 0.5) ln(1 / 0.5)
    expected = (EPSILON - 0.5) * math.log(EPSILON / 0.5) + 0.5 * math.log(2)
    assert math.isfinite(value) and value == pytest.approx(expected)
    # Buckets empty on both sides add nothing.
    padded = Distributions.of({"0.1": 0, "0.5": 0, "+Inf": 100}, {"0.1": 0, "0.5": 50, "+Inf": 100})
    assert psi(padded.recent, padded.reference) == pytest.approx(value)


def test_cumulative_counts_that_dip_count_as_empty_buckets() -> None:
    # increase() extrapolates each bucket series on its own: a bound may read lower
    # than the one below it.
    bounds, counts = bucket_counts({"+Inf": 10.0, "0.5": 10.2, "0.1": 3.0})
    assert bounds == [0.1, 0.5, math.inf]
    assert counts == [3.0, pytest.approx(7.2), 0.0]


def test_histograms_that_cannot_be_compared_are_an_error() -> None:
    with pytest.raises(DriftInputError, match="different buckets"):
        Distributions.of({"0.5": 1, "+Inf": 2}, {"0.4": 1, "+Inf": 2})
    with pytest.raises(DriftInputError, match="observed nothing"):
        Distributions.of({"0.5": 0, "+Inf": 0}, {"0.5": 1, "+Inf": 2})
    with pytest.raises(DriftInputError, match="observed nothing"):
        Distributions.of({}, {})
