"""Canary and stable metrics from Prometheus, over the gateway's metrics.

Counters are read with `increase()`, which counts through restarts (resets);
latency is `histogram_quantile` over the gateway's request-duration histogram;
impressions, clicks, dwell and purchases come per user bucket (`sum by (bucket)`),
which the analysis needs for its variance. Any error, empty vector or NaN becomes
None, which the analysis treats as inconclusive - never as a pass (an empty vector of
clicks, dwell or purchases is zero of them).

The window of a step's analysis covers the whole step so far: after a Wait or a hold
the next analysis sees the earlier intervals too, so waiting gathers impressions.
Each analysis also reads every earlier step's window (from its start to the next
step's, in `status.canary.stepStarts`, evaluated at the window's end), which the
analysis combines stratified by step. A rollout whose history is incomplete (started
by an operator without `stepStarts`) judges its own step's window only, at the
union-bound level that stays valid without the history.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime

from recsys_contracts.metric_names import (
    BUCKET_LABEL,
    CLICKS,
    DWELL_SECONDS,
    GATEWAY_FALLBACKS,
    GATEWAY_LATENCY,
    GATEWAY_REQUESTS,
    IMPRESSIONS,
    PURCHASES,
)
from recsys_operator.api.recommender_system import RolloutSpec
from recsys_operator.api.status import AnalysisResult, CanaryStatus
from recsys_operator.rollout.analysis import Look, StepMetrics, VariantMetrics, analyse
from recsys_operator.rollout.prometheus_reader import PrometheusReader, range_duration


def variant_queries(system_id: str, variant: str, version: str, window_s: float) -> dict[str, str]:
    """PromQL for one variant's numbers over the last `window_s` seconds."""
    sel = f'system="{system_id}",variant="{variant}",model_version="{version}"'
    w = range_duration(window_s)
    return {
        "p99_ms": f"histogram_quantile(0.99, sum by (le) (rate({GATEWAY_LATENCY}_bucket{{{sel}}}[{w}]))) * 1000",
        "requests": f"sum(increase({GATEWAY_REQUESTS}{{{sel}}}[{w}]))",
        # A request answered from the popularity fallback is a 200 to the client but a
        # failure of this version: it counts as an error, like a 5xx.
        "errors": (
            f'(sum(increase({GATEWAY_REQUESTS}{{{sel},code=~"5.."}}[{w}])) or vector(0))'
            f" + (sum(increase({GATEWAY_FALLBACKS}{{{sel}}}[{w}])) or vector(0))"
        ),
    }


def bucket_queries(
    system_id: str, variant: str, version: str, window_s: float, guardrails: bool
) -> dict[str, str]:
    """PromQL for one variant's per-bucket counts over the last `window_s` seconds."""
    sel = f'system="{system_id}",variant="{variant}",model_version="{version}"'
    w = range_duration(window_s)
    counters = {"impressions": IMPRESSIONS, "clicks": CLICKS}
    if guardrails:
        counters |= {"dwell_seconds": DWELL_SECONDS, "purchases": PURCHASES}
    return {
        name: f"sum by ({BUCKET_LABEL}) (increase({metric}{{{sel}}}[{w}]))"
        for name, metric in counters.items()
    }


def step_window_s(canary: CanaryStatus, interval_s: float) -> float:
    """The step so far: every hold (Wait, Inconclusive, mismatch) restarted the interval."""
    return interval_s * (canary.inconclusive_count + 1)


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def earlier_windows(canary: CanaryStatus) -> list[tuple[float, float]] | None:
    """(window seconds, end as a Unix time) of each step before the current one;
    None when the status does not have every step's start."""
    starts = canary.step_starts
    if len(starts) != canary.step + 1:
        return None
    times = [_timestamp(t) for t in starts]
    return [(end - start, end) for start, end in itertools.pairwise(times)]


class PrometheusSource:
    """Analyses a canary with numbers queried from one Prometheus server."""

    def __init__(
        self, url: str, system_id: str, stable_version: str, spec: RolloutSpec, timeout_s: int = 5
    ):
        # A Prometheus that is down turns into "inconclusive" quickly (one attempt per query).
        self.reader = PrometheusReader(url, timeout_s)
        self.system_id = system_id
        self.stable_version = stable_version
        self.spec = spec

    def _bucket_counts(
        self, variant: str, version: str, window_s: float, at: float | None
    ) -> dict[str, dict[str, float] | None]:
        analysis = self.spec.analysis
        guardrails = analysis.min_dwell_ratio is not None or analysis.min_purchase_ratio is not None
        buckets = {
            name: self.reader.values_by(BUCKET_LABEL, query, at)
            for name, query in bucket_queries(
                self.system_id, variant, version, window_s, guardrails
            ).items()
        }
        if not buckets["impressions"]:  # no impressions at all is no answer, not zero
            buckets["impressions"] = None
        return buckets

    def _variant(self, variant: str, version: str, window_s: float) -> VariantMetrics:
        scalars = {
            name: self.reader.value(query)
            for name, query in variant_queries(self.system_id, variant, version, window_s).items()
        }
        buckets = self._bucket_counts(variant, version, window_s, None)
        return VariantMetrics(**scalars, **buckets)  # type: ignore[arg-type]

    def _earlier_step(self, version: str, window_s: float, end: float) -> StepMetrics:
        """An earlier step's counts over [end - window_s, end]."""
        sides = [
            VariantMetrics(None, None, None, **self._bucket_counts(variant, v, window_s, end))
            for variant, v in (("canary", version), ("stable", self.stable_version))
        ]
        return StepMetrics(*sides)

    async def __call__(self, canary: CanaryStatus, interval_s: float) -> AnalysisResult:
        window_s = step_window_s(canary, interval_s)
        windows = earlier_windows(canary)
        canary_metrics, stable_metrics = await asyncio.gather(
            asyncio.to_thread(self._variant, "canary", canary.version, window_s),
            asyncio.to_thread(self._variant, "stable", self.stable_version, window_s),
        )
        earlier = await asyncio.gather(
            *(
                asyncio.to_thread(self._earlier_step, canary.version, seconds, end)
                for seconds, end in windows or []
            )
        )
        look = Look.at(
            self.spec.steps,
            canary.step,
            self.spec.analysis.confidence,
            cumulative=windows is not None,
            sample_ratio_p_value=self.spec.analysis.sample_ratio_p_value,
        )
        return analyse(canary_metrics, stable_metrics, self.spec.analysis, look, earlier)
