"""Judging the shadow phase: the canary's mirrored answers against the stable's.

The gateway compares each mirrored pair of lists as it gets them (`gateway.shadow`)
and exports the comparisons; `PrometheusShadowSource` reads them over the phase's
window and `judge_shadow` decides, in this order:

1. no mirrored request seen (or Prometheus unreachable): Inconclusive, never a pass;
2. the canary failed more than `maxErrorRate` of them: Fail;
3. fewer than `minRequests` compared: Wait;
4. mean overlap below `minOverlap`: Fail;
5. canary predicted CTR below `minPredictedCtrRatio` x the stable's: Fail;
6. otherwise Pass.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

from recsys_contracts.metric_names import (
    GATEWAY_SHADOW_OVERLAP,
    GATEWAY_SHADOW_PREDICTED_CTR,
    GATEWAY_SHADOW_REQUESTS,
)
from recsys_operator.api.recommender_system import ShadowSpec
from recsys_operator.api.status import AnalysisDecision, CanaryStatus, ShadowResult
from recsys_operator.rollout.prometheus_reader import PrometheusReader, range_duration


@dataclass(frozen=True)
class ShadowNumbers:
    compared: float | None
    failed: float | None
    mean_overlap: float | None
    canary_predicted_ctr: float | None
    stable_predicted_ctr: float | None


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def judge_shadow(numbers: ShadowNumbers, spec: ShadowSpec) -> ShadowResult:
    compared = int(numbers.compared or 0)
    failed = int(numbers.failed or 0)
    result = ShadowResult(
        time=_now(),
        decision=AnalysisDecision.INCONCLUSIVE,
        compared=None if numbers.compared is None else compared,
        failed=None if numbers.failed is None else failed,
        mean_overlap=numbers.mean_overlap,
        canary_predicted_ctr=numbers.canary_predicted_ctr,
        stable_predicted_ctr=numbers.stable_predicted_ctr,
    )

    def decide(decision: AnalysisDecision, reason: str) -> ShadowResult:
        return result.model_copy(update={"decision": decision, "reason": reason})

    if numbers.compared is None or compared + failed == 0:
        return decide(AnalysisDecision.INCONCLUSIVE, "no mirrored requests seen in the window")
    error_rate = failed / (compared + failed)
    if error_rate > spec.max_error_rate:
        return decide(
            AnalysisDecision.FAIL,
            f"canary failed {failed} of {compared + failed} mirrored requests "
            f"({error_rate:.4f} > maxErrorRate {spec.max_error_rate})",
        )
    if compared < spec.min_requests:
        return decide(
            AnalysisDecision.WAIT,
            f"too few mirrored requests compared: {compared}, need {spec.min_requests}",
        )
    overlap, canary, stable = (
        numbers.mean_overlap,
        numbers.canary_predicted_ctr,
        numbers.stable_predicted_ctr,
    )
    if overlap is None or canary is None or stable is None:
        return decide(AnalysisDecision.INCONCLUSIVE, "shadow comparisons missing from Prometheus")
    numbers_text = (
        f"{compared} compared, overlap {overlap:.3f}, predicted CTR canary {canary:.4f} "
        f"vs stable {stable:.4f}"
    )
    if overlap < spec.min_overlap:
        return decide(
            AnalysisDecision.FAIL,
            f"{numbers_text}: overlap below minOverlap {spec.min_overlap}",
        )
    if stable > 0 and canary < spec.min_predicted_ctr_ratio * stable:
        return decide(
            AnalysisDecision.FAIL,
            f"{numbers_text}: ratio {canary / stable:.3f} below minPredictedCtrRatio "
            f"{spec.min_predicted_ctr_ratio}",
        )
    return decide(AnalysisDecision.PASS, numbers_text)


def shadow_queries(system_id: str, version: str, window_s: float) -> dict[str, str]:
    sel = f'system="{system_id}",model_version="{version}"'
    w = range_duration(window_s)

    def mean(metric: str, extra: str = "") -> str:
        return (
            f"sum(increase({metric}_sum{{{sel}{extra}}}[{w}]))"
            f" / sum(increase({metric}_count{{{sel}{extra}}}[{w}]))"
        )

    return {
        "compared": f'sum(increase({GATEWAY_SHADOW_REQUESTS}{{{sel},outcome="compared"}}[{w}])) or vector(0)',
        "failed": f'sum(increase({GATEWAY_SHADOW_REQUESTS}{{{sel},outcome="failed"}}[{w}])) or vector(0)',
        "mean_overlap": mean(GATEWAY_SHADOW_OVERLAP),
        "canary_predicted_ctr": mean(GATEWAY_SHADOW_PREDICTED_CTR, ',variant="canary"'),
        "stable_predicted_ctr": mean(GATEWAY_SHADOW_PREDICTED_CTR, ',variant="stable"'),
    }


class PrometheusShadowSource:
    """Judges a canary's shadow phase with the gateway's shadow metrics in Prometheus."""

    def __init__(self, url: str, system_id: str, spec: ShadowSpec, timeout_s: int = 5) -> None:
        # A Prometheus that is down turns into "inconclusive" quickly (one attempt per query).
        self.reader = PrometheusReader(url, timeout_s)
        self.system_id = system_id
        self.spec = spec

    def _scalar(self, query: str) -> float | None:
        value = self.reader.value(query)
        return None if value != value else value  # NaN: no data

    def _numbers(self, version: str, window_s: float) -> ShadowNumbers:
        queries = shadow_queries(self.system_id, version, window_s)
        return ShadowNumbers(**{name: self._scalar(query) for name, query in queries.items()})

    async def __call__(self, canary: CanaryStatus, window_s: float) -> ShadowResult:
        numbers = await asyncio.to_thread(self._numbers, canary.version, window_s)
        return judge_shadow(numbers, self.spec)
