"""Canary and stable metrics from Prometheus, over the gateway's metrics.

Counters are read with `increase()`, which counts through restarts (resets);
latency is `histogram_quantile` over the gateway's request-duration histogram.
Any error, empty vector or NaN becomes None, which the analysis treats as
inconclusive - never as a pass.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from recsys_contracts.metric_names import (
    CLICKS,
    GATEWAY_FALLBACKS,
    GATEWAY_LATENCY,
    GATEWAY_REQUESTS,
    IMPRESSIONS,
)
from recsys_operator.api.recommender_system import AnalysisSpec
from recsys_operator.api.status import AnalysisResult, CanaryStatus
from recsys_operator.rollout.analysis import VariantMetrics, analyse

log = logging.getLogger(__name__)


def variant_queries(system_id: str, variant: str, version: str, window_s: float) -> dict[str, str]:
    """PromQL for one variant's numbers over the last `window_s` seconds."""
    sel = f'system="{system_id}",variant="{variant}",model_version="{version}"'
    w = f"{max(int(window_s), 15)}s"
    return {
        "p99_ms": f"histogram_quantile(0.99, sum by (le) (rate({GATEWAY_LATENCY}_bucket{{{sel}}}[{w}]))) * 1000",
        "requests": f"sum(increase({GATEWAY_REQUESTS}{{{sel}}}[{w}]))",
        # A request answered from the popularity fallback is a 200 to the client but a
        # failure of this version: it counts as an error, like a 5xx.
        "errors": (
            f'(sum(increase({GATEWAY_REQUESTS}{{{sel},code=~"5.."}}[{w}])) or vector(0))'
            f" + (sum(increase({GATEWAY_FALLBACKS}{{{sel}}}[{w}])) or vector(0))"
        ),
        "impressions": f"sum(increase({IMPRESSIONS}{{{sel}}}[{w}]))",
        "clicks": f"sum(increase({CLICKS}{{{sel}}}[{w}])) or vector(0)",
    }


class PrometheusSource:
    """Analyses a canary with numbers queried from one Prometheus server."""

    def __init__(
        self, url: str, system_id: str, stable_version: str, spec: AnalysisSpec, timeout_s: int = 5
    ):
        # One attempt per query: a Prometheus that is down must turn into "inconclusive" quickly.
        self.prometheus = PrometheusConnect(
            url=url,
            disable_ssl=True,
            timeout=timeout_s,
            retry=Retry(total=0, connect=0, read=0),
        )
        self.system_id = system_id
        self.stable_version = stable_version
        self.spec = spec

    def _scalar(self, query: str) -> float | None:
        try:
            result = self.prometheus.custom_query(query)
        except Exception as exc:  # unreachable, timeout, bad answer: all mean "no data"
            log.warning("Prometheus query failed (%s): %s", exc, query)
            return None
        if not result:
            return None
        try:
            return float(result[0]["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            return None

    def _variant(self, variant: str, version: str, window_s: float) -> VariantMetrics:
        q = variant_queries(self.system_id, variant, version, window_s)
        return VariantMetrics(**{name: self._scalar(query) for name, query in q.items()})

    async def __call__(self, canary: CanaryStatus, window_s: float) -> AnalysisResult:
        canary_metrics, stable_metrics = await asyncio.gather(
            asyncio.to_thread(self._variant, "canary", canary.version, window_s),
            asyncio.to_thread(self._variant, "stable", self.stable_version, window_s),
        )
        return analyse(canary_metrics, stable_metrics, self.spec)
