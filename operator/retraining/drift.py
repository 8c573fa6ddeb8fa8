"""How far one bucketed distribution moved from another: PSI and the KS statistic.

Both sides are Prometheus histograms read as bucket increases over a window: cumulative
counts per upper bound (`le`, `+Inf` last), as `increase(x_bucket[w])` returns them. They
become per-bucket counts (differences of neighbours), then shares of the side's total.

- PSI (population stability index): sum over buckets of (p - q) * ln(p / q), p the recent
  share, q the reference share. 0.1 is a moderate shift, 0.25 a large one.
- KS: the largest gap between the two cumulative shares, taken at the bucket bounds. It
  is the two-sample Kolmogorov-Smirnov statistic of the samples rounded up to their
  bucket's bound (a lower bound of the exact one, which would need the raw values).

Empty buckets: a share of 0 on one side makes PSI infinite, although one stray answer
would make it finite, so every share is floored at EPSILON (not renormalised: the floor
adds at most buckets x EPSILON to a side). A bucket empty on both sides then adds
nothing, and one empty on one side adds a large but finite term. KS needs no floor.
`prometheus_client` and PromQL's `increase()` can make neighbouring cumulative counts
dip (extrapolation per series), so negative differences count as 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

EPSILON = 1e-4
"""Floor of a bucket's share in PSI (0.01% of the observations)."""


class DriftInputError(ValueError):
    """The two histograms cannot be compared (different buckets, nothing observed)."""


def _bound(le: str) -> float:
    return math.inf if le in ("+Inf", "Inf", "inf") else float(le)


def bucket_counts(cumulative: Mapping[str, float]) -> tuple[list[float], list[float]]:
    """(upper bounds ascending, count in each bucket) from `le` -> cumulative count."""
    pairs = sorted((_bound(le), value) for le, value in cumulative.items())
    bounds = [b for b, _ in pairs]
    counts, below = [], 0.0
    for _, value in pairs:
        counts.append(max(value - below, 0.0))
        below = max(value, below)
    return bounds, counts


@dataclass(frozen=True)
class Distributions:
    """Two histograms over the same buckets, as shares of their totals."""

    bounds: list[float]
    recent: list[float]
    reference: list[float]
    recent_total: float
    reference_total: float

    @classmethod
    def of(cls, recent: Mapping[str, float], reference: Mapping[str, float]) -> Distributions:
        if not recent or not reference:  # no series: nothing observed in the window
            raise DriftInputError("a side observed nothing; there is no distribution to compare")
        bounds, recent_counts = bucket_counts(recent)
        reference_bounds, reference_counts = bucket_counts(reference)
        if bounds != reference_bounds:
            raise DriftInputError(
                f"the histograms have different buckets ({len(bounds)} and "
                f"{len(reference_bounds)} bounds); compare one metric with itself"
            )
        totals = sum(recent_counts), sum(reference_counts)
        if min(totals) <= 0:
            raise DriftInputError("a side observed nothing; there is no distribution to compare")
        return cls(
            bounds,
            [c / totals[0] for c in recent_counts],
            [c / totals[1] for c in reference_counts],
            *totals,
        )


def psi(recent: Sequence[float], reference: Sequence[float]) -> float:
    """Population stability index of two share vectors over the same buckets."""
    total = 0.0
    for p, q in zip(recent, reference, strict=True):
        p, q = max(p, EPSILON), max(q, EPSILON)
        total += (p - q) * math.log(p / q)
    return total


def ks(recent: Sequence[float], reference: Sequence[float]) -> float:
    """The largest gap between the cumulative shares, at the bucket bounds."""
    gap = below_p = below_q = 0.0
    for p, q in zip(recent, reference, strict=True):
        below_p += p
        below_q += q
        gap = max(gap, abs(below_p - below_q))
    return gap
