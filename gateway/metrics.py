"""The Prometheus metrics of one gateway instance.

Each instance has its own registry (tests run several gateways in one process).
Per-version metrics carry `model_version` and `variant` labels, and all carry the
routing's `system` (`<namespace>.<name>`), as `recsys_contracts.metric_names` describes.

Label conventions the rollout analysis relies on:
- latency and requests are labelled with the version the user was *assigned*,
  also when it failed and the fallback answered, so a slow or failing canary
  shows in the canary's own latency and fallback counts;
- impressions and clicks are labelled with the version that *ranked the items
  shown*: `fallback` when the fallback answered, so popularity answers never count
  towards a model's CTR; dwell and purchases are attributed like clicks;
- impressions, clicks, dwell and purchases also carry `bucket`, a hash of the user id
  into 64 values (`recsys_contracts.variant_assignment.analysis_bucket`): the analysis measures from
  it how much users differ. Totals per version are a `sum by` away.
"""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)

from recsys_contracts.metric_names import (
    ANALYSIS_BUCKETS,
    BUCKETED_LABELS,
    CLICKS,
    DWELL_SECONDS,
    GATEWAY_EVENTS_DROPPED,
    GATEWAY_EVENTS_SENT,
    GATEWAY_FALLBACKS,
    GATEWAY_IN_FLIGHT,
    GATEWAY_LATENCY,
    GATEWAY_PINNED_CLICKS,
    GATEWAY_PINNED_REQUESTS,
    GATEWAY_REQUESTS,
    GATEWAY_ROUTING_RELOADS,
    GATEWAY_SHADOW_OVERLAP,
    GATEWAY_SHADOW_PREDICTED_CTR,
    GATEWAY_SHADOW_REQUESTS,
    GATEWAY_SHED,
    GATEWAY_UNVERIFIED_REQUEST_IDS,
    IMPRESSIONS,
    PURCHASES,
    SERVED_SCORE_BUCKETS,
    SERVED_TOP_SCORE,
    VERSION_LABELS,
)

# 1 ms .. 2 s: the gateway adds about a millisecond, serving takes a few to tens, and
# the routing's timeout (250 ms by default) caps a call before the fallback answers.
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.0,
)  # fmt: skip


Metric = TypeVar("Metric", Counter, Gauge, Histogram, Summary)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._bucketed: set[tuple[str, str, str]] = set()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        r = self.registry
        self.request_duration = Histogram(
            GATEWAY_LATENCY,
            "Time to answer POST /v1/recommend, including the serving call.",
            VERSION_LABELS,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.requests = Counter(
            GATEWAY_REQUESTS,
            "Answers to POST /v1/recommend by HTTP status (empty version and variant: refused before assignment).",
            (*VERSION_LABELS, "code"),
            registry=r,
        )
        self.impressions = Counter(
            IMPRESSIONS,
            "Recommendation lists shown (one per non-empty response).",
            BUCKETED_LABELS,
            registry=r,
        )
        self.clicks = Counter(
            CLICKS,
            "Click events attributed, through their request_id, to the version that served them.",
            BUCKETED_LABELS,
            registry=r,
        )
        self.dwell_seconds = Counter(
            DWELL_SECONDS,
            "Dwell time (dwell events' dwell_ms, in seconds) attributed like clicks.",
            BUCKETED_LABELS,
            registry=r,
        )
        self.purchases = Counter(
            PURCHASES,
            "Purchase events attributed like clicks.",
            BUCKETED_LABELS,
            registry=r,
        )
        self.served_top_score = Histogram(
            SERVED_TOP_SCORE,
            "The best score of each answer a model ranked (not fallback or pinned answers).",
            VERSION_LABELS,
            buckets=SERVED_SCORE_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            GATEWAY_FALLBACKS,
            "Responses answered from the popularity fallback, by why serving failed.",
            (*VERSION_LABELS, "reason"),
            registry=r,
        )
        self.shed = Counter(
            GATEWAY_SHED,
            "Recommend requests answered 503 at once by admission control, by reason "
            "(in_flight: the gateway's limit was reached; deadline: too little of the "
            "serving timeout was left).",
            ("system", "reason"),
            registry=r,
        )
        self.in_flight = Gauge(
            GATEWAY_IN_FLIGHT,
            "Recommend requests being worked on now (admission control's count).",
            ("system",),
            registry=r,
        )
        self.events_sent = Counter(
            GATEWAY_EVENTS_SENT,
            "Events the broker acknowledged, by stream (impressions | interactions).",
            ("system", "stream"),
            registry=r,
        )
        self.events_dropped = Counter(
            GATEWAY_EVENTS_DROPPED,
            "Events that never reached the broker, by reason.",
            ("system", "reason"),
            registry=r,
        )
        self.pinned_requests = Counter(
            GATEWAY_PINNED_REQUESTS,
            "Answers to POST /v1/recommend pinned to a variant (X-Recsys-Variant or the recsys_variant cookie); not in the analysis.",
            (*VERSION_LABELS, "code"),
            registry=r,
        )
        self.pinned_clicks = Counter(
            GATEWAY_PINNED_CLICKS,
            "Clicks on pinned answers; not in the analysis.",
            VERSION_LABELS,
            registry=r,
        )
        self.shadow_requests = Counter(
            GATEWAY_SHADOW_REQUESTS,
            "Requests mirrored to the canary in a shadow phase, by outcome (compared | failed | skipped).",
            ("system", "model_version", "outcome"),
            registry=r,
        )
        self.shadow_overlap = Summary(
            GATEWAY_SHADOW_OVERLAP,
            "Per compared shadow request: the share of the stable's items the canary also recommends.",
            ("system", "model_version"),
            registry=r,
        )
        self.shadow_predicted_ctr = Summary(
            GATEWAY_SHADOW_PREDICTED_CTR,
            "Per compared shadow request: the predicted CTR of each list (variant stable | canary).",
            ("system", "model_version", "variant"),
            registry=r,
        )
        self.routing_reloads = Counter(
            GATEWAY_ROUTING_RELOADS,
            "Changes of the routing seen: applied (ok) or rejected (invalid, unreadable).",
            ("result",),
            registry=r,
        )
        self.unverified_request_ids = Counter(
            GATEWAY_UNVERIFIED_REQUEST_IDS,
            "Events refused (422) because their request_id was not signed by an accepted key.",
            ("system",),
            registry=r,
        )

    def child(self, metric: Metric, *values: str) -> Metric:
        """`metric.labels(*values)`, looked up once per series: prometheus_client's
        `labels()` checks and converts its arguments and takes a lock on every call,
        microseconds a request spends several times. Series are never removed, so a
        child found once stays the one the registry exposes. Safe from any thread (the
        Pulsar client's report sends): two threads racing on a new series both get the
        child `labels()` keeps."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def count_impression(self, system: str, model_version: str, variant: str, bucket: str) -> None:
        self.ensure_buckets(system, model_version, variant)
        self.child(self.impressions, system, model_version, variant, bucket).inc()

    def ensure_buckets(self, system: str, model_version: str, variant: str) -> None:
        """Create every bucket's series of a version at zero, once.

        Prometheus' increase() ignores a series' first sample, so a series born with
        the first click of its bucket would lose that click; across 64 buckets a new
        canary would lose dozens of its first clicks. Born at zero, none is lost."""
        key = (system, model_version, variant)
        if key in self._bucketed:
            return
        self._bucketed.add(key)
        for bucket in range(ANALYSIS_BUCKETS):
            for counter in (self.impressions, self.clicks, self.dwell_seconds, self.purchases):
                counter.labels(system, model_version, variant, str(bucket))

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
