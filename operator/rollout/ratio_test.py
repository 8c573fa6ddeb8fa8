"""Canary-versus-stable comparisons of per-impression rates, robust to users who differ.

Every rate the analysis judges is a ratio of two sums over impressions: CTR is clicks
per impression, dwell is dwell seconds per impression, purchase rate is purchases per
impression. Impressions of one user are not independent (some users click a lot, most
little), so the gateway counts them per *bucket* of users (a hash of the user id,
independent of the variant) and the variance is computed from how the buckets differ:
the cluster-robust (sandwich) variance of the delta method, with whole users inside
each cluster. docs/rollout-analysis.md derives the formulas; this module is pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Buckets = Mapping[str, float]
"""bucket label -> count over the window (a missing bucket counts zero)."""


def normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def normal_quantile(p: float) -> float:
    """Inverse of `normal_cdf` (Acklam's rational approximation, refined by one Newton step)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a probability strictly between 0 and 1 is needed, got {p}")
    a = (-39.69683028665376, 220.9460984245205, -275.9285104469687, 138.3577518672690,
         -30.66479806614716, 2.506628277459239)  # fmt: skip
    b = (-54.47609879822406, 161.5858368580409, -155.6989798598866, 66.80131188771972,
         -13.28068155288572)  # fmt: skip
    c = (-0.007784894002430293, -0.3223964580411365, -2.400758277161838, -2.549732539343734,
         4.374664141464968, 2.938163982698783)  # fmt: skip
    d = (0.007784695709041462, 0.3224671290700398, 2.445134137142996, 3.754408661907416)
    low = 0.02425
    if p < low:
        q = math.sqrt(-2 * math.log(p))
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
    elif p <= 1 - low:
        q = p - 0.5
        r = q * q
        x = (
            (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5])
            * q
            / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
        )
    else:
        q = math.sqrt(-2 * math.log(1 - p))
        x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
    # One Newton step on Phi(x) - p brings the error to machine precision.
    density = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    return x - (normal_cdf(x) - p) / density


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (df >= 1)."""
    if t == 0:
        return 0.5
    x = df / (df + t * t)
    a, b = df / 2, 0.5
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        tail = math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    else:
        tail = 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1 - x) / b
    tail /= 2  # P(T > |t|)
    return tail if t < 0 else 1.0 - tail


@dataclass(frozen=True)
class RatioComparison:
    """Canary rate against `min_ratio` x stable rate, with its cluster-robust standard error."""

    canary_rate: float
    stable_rate: float
    min_ratio: float
    std_error: float
    """Of the difference canary_rate - min_ratio x stable_rate, at the threshold."""
    buckets: int
    """Buckets with impressions on either side: the clusters the variance comes from."""
    impressions: float
    """Both variants together."""

    @property
    def difference(self) -> float:
        return self.canary_rate - self.min_ratio * self.stable_rate

    @property
    def p_value(self) -> float:
        """One-sided p-value of "canary rate < min_ratio x stable rate" (small: canary worse).

        From Student's t with buckets - 1 degrees of freedom: the variance is estimated
        from that many clusters, and the normal's tails would be too thin for the
        small per-look levels (about 1% instead of 0.85% at 64 buckets)."""
        if self.std_error <= 0:  # no spread at all: the sign of the difference decides
            return 0.0 if self.difference < 0 else 1.0
        return student_t_cdf(self.difference / self.std_error, self.buckets - 1)

    def impressions_needed(self, drop: float, alpha: float, power: float) -> float:
        """Impressions (both variants, at this weight) at which a canary whose rate is
        `drop` (relative) below stable's is found significantly below the threshold at
        level `alpha` with probability `power`; inf if that can never happen.

        The variance shrinks as 1/impressions at a fixed weight and user mix, so
        n* = n x se^2 x ((z_{1-alpha} + z_power) / delta)^2, with
        delta = (min_ratio - (1 - drop)) x stable rate, the drop's distance below the threshold.
        """
        delta = (self.min_ratio - (1.0 - drop)) * self.stable_rate
        if delta <= 0 or self.impressions <= 0:
            return math.inf
        if self.std_error <= 0:
            return self.impressions
        z = normal_quantile(1 - alpha) + normal_quantile(power)
        return self.impressions * self.std_error**2 * (z / delta) ** 2


def compare_rates(
    canary_numerator: Buckets,
    canary_impressions: Buckets,
    stable_numerator: Buckets,
    stable_impressions: Buckets,
    min_ratio: float,
) -> RatioComparison:
    """The delta-method comparison of two ratio metrics with bucket-clustered variance.

    With p = sum(y) / sum(n) per variant and D = p_c - r p_s, each bucket b contributes
      e_b = (y_cb - q_c n_cb) / N_c - r (y_sb - q_s n_sb) / N_s
    to the linearised D, and Var(D) = B / (B - 1) x sum_b e_b^2 over the B buckets seen
    (the small-sample factor of the CR1 sandwich estimator). The rates q are those of
    the threshold, q_c = r q_s with q_s = (Y_c + Y_s) / (r N_c + N_s): the variance is
    taken where the test draws its line (a score test). With the observed rates
    instead (a Wald test) an identical canary was rolled back about 8% more often than
    the level says, because a low canary rate comes with a low estimated variance.
    Needs impressions on both sides; raises ValueError otherwise.
    """
    return compare_strata(
        [Stratum(canary_numerator, canary_impressions, stable_numerator, stable_impressions)],
        min_ratio,
    )


@dataclass(frozen=True)
class Stratum:
    """One step's window: canary and stable counts per bucket, at that step's weight."""

    canary_numerator: Buckets
    canary_impressions: Buckets
    stable_numerator: Buckets
    stable_impressions: Buckets


@dataclass(frozen=True)
class _StratumTerms:
    canary_rate: float
    stable_rate: float
    contributions: dict[str, float]
    """bucket -> e_b, the bucket's term of the linearised difference."""
    impressions: float

    @property
    def variance(self) -> float:
        count = len(self.contributions)
        squares = sum(e * e for e in self.contributions.values())
        return squares * count / (count - 1) if count > 1 else 0.0


def _stratum_terms(stratum: Stratum, min_ratio: float) -> _StratumTerms:
    y_cb, n_cb = stratum.canary_numerator, stratum.canary_impressions
    y_sb, n_sb = stratum.stable_numerator, stratum.stable_impressions
    n_c, n_s = sum(n_cb.values()), sum(n_sb.values())
    if n_c <= 0 or n_s <= 0:
        raise ValueError("a rate comparison needs impressions on both variants")
    y_c, y_s = sum(y_cb.values()), sum(y_sb.values())
    q_s = (y_c + y_s) / (min_ratio * n_c + n_s)
    q_c = min_ratio * q_s
    seen = {b for counts in (n_cb, n_sb, y_cb, y_sb) for b, value in counts.items() if value > 0}
    contributions = {
        b: (y_cb.get(b, 0.0) - q_c * n_cb.get(b, 0.0)) / n_c
        - min_ratio * (y_sb.get(b, 0.0) - q_s * n_sb.get(b, 0.0)) / n_s
        for b in seen
    }
    return _StratumTerms(y_c / n_c, y_s / n_s, contributions, n_c + n_s)


def compare_strata(strata: Sequence[Stratum], min_ratio: float) -> RatioComparison:
    """Canary against min_ratio x stable over several steps, stratified by step.

    Each step j has its own difference D_j = p_cj - r p_sj, from the canary and stable
    traffic of the same window (so a CTR that drifts over the day, or a weight that
    changes, cannot pass for the canary: no Simpson's paradox). They are combined with
    inverse-variance weights a_j = (1 / V_j) / sum_i (1 / V_i), D = sum_j a_j D_j. The
    same users fall into the same bucket at every step, so the steps are not
    independent; the variance is taken over buckets of the combined linearisation,
      e_b = sum_j a_j e_bj,   Var(D) = B / (B - 1) x sum_b e_b^2,
    which counts the covariance between steps that a user who stays on one side brings.
    One stratum is `compare_rates`. The rates reported are the weighted ones,
    sum_j a_j p_cj and sum_j a_j p_sj, so that D is their difference as usual.
    """
    if not strata:
        raise ValueError("a rate comparison needs at least one step")
    terms = [_stratum_terms(stratum, min_ratio) for stratum in strata]
    variances = [t.variance for t in terms]
    if all(v > 0 for v in variances):
        raw = [1.0 / v for v in variances]
    else:  # a step without spread: weigh by impressions instead (the variance's scale)
        raw = [t.impressions for t in terms]
    weights = [w / sum(raw) for w in raw]
    combined: dict[str, float] = {}
    for weight, term in zip(weights, terms, strict=True):
        for b, e in term.contributions.items():
            combined[b] = combined.get(b, 0.0) + weight * e
    count = len(combined)
    squares = sum(e * e for e in combined.values())
    variance = squares * count / (count - 1) if count > 1 else 0.0
    return RatioComparison(
        canary_rate=sum(w * t.canary_rate for w, t in zip(weights, terms, strict=True)),
        stable_rate=sum(w * t.stable_rate for w, t in zip(weights, terms, strict=True)),
        min_ratio=min_ratio,
        std_error=math.sqrt(variance),
        buckets=count,
        impressions=sum(t.impressions for t in terms),
    )


@dataclass(frozen=True)
class SampleRatio:
    """The canary's observed share of impressions against its configured weight."""

    canary_share: float
    expected_share: float
    chi_square: float
    """(share - expected)^2 / Var(share), 1 degree of freedom."""
    buckets: int = 0
    """Buckets the variance comes from; 0: the variance is taken as known."""

    @property
    def p_value(self) -> float:
        """Two-sided: 2 P(T <= -sqrt(statistic)) with T Student's t on buckets - 1 degrees
        of freedom, since Var(share) is estimated from the buckets (at the check's 0.001
        the normal's tail, 2 (1 - Phi(sqrt(statistic))), is about 40% too thin at 64
        buckets, and persistent false alarms ended rollouts of good canaries)."""
        if math.isinf(self.chi_square):
            return 0.0
        if self.buckets > 1:
            return 2.0 * student_t_cdf(-math.sqrt(self.chi_square), self.buckets - 1)
        return 2.0 * (1.0 - normal_cdf(math.sqrt(self.chi_square)))


def sample_ratio(
    canary_impressions: Buckets, stable_impressions: Buckets, expected_share: float
) -> SampleRatio:
    """Chi-square test of the canary's share of impressions, with bucket-clustered variance.

    Users, not impressions, are assigned to a variant, so impressions arrive in clumps;
    the textbook chi-square on impression counts, N (s - w)^2 / (w (1 - w)), would flag
    clumps as mismatches. Here the share s = sum(n_c) / sum(n) is linearised per bucket,
    e_b = (n_cb - s n_b) / N, and Var(s) = B / (B - 1) x sum_b e_b^2.
    """
    n_c, n_s = sum(canary_impressions.values()), sum(stable_impressions.values())
    total = n_c + n_s
    if total <= 0:
        raise ValueError("a sample-ratio check needs impressions")
    share = n_c / total
    seen = {
        b
        for counts in (canary_impressions, stable_impressions)
        for b, value in counts.items()
        if value > 0
    }
    squares = 0.0
    for b in seen:
        n_cb = canary_impressions.get(b, 0.0)
        e = (n_cb - share * (n_cb + stable_impressions.get(b, 0.0))) / total
        squares += e * e
    count = len(seen)
    variance = squares * count / (count - 1) if count > 1 else 0.0
    gap = share - expected_share
    # Every bucket with the same share (no variance) is exact, or infinitely far off.
    no_spread = 0.0 if gap == 0 else math.inf
    chi_square = gap * gap / variance if variance > 0 else no_spread
    return SampleRatio(
        canary_share=share, expected_share=expected_share, chi_square=chi_square, buckets=count
    )
