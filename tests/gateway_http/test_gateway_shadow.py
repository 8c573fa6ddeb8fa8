"""Shadow traffic over real HTTP: with `shadowPercent` the canary answers mirrored
requests that users never see, and the comparisons land in the shadow metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import requests
from gateway_testing import SYSTEM, StartGateway, metric_value, routing_document, wait_until
from serving_stub import ServingStub, stub_items

from gateway.shadow import ItemCtr, overlap
from recsys_operator.api.recommender_system import ShadowSpec
from recsys_operator.api.status import AnalysisDecision, CanaryStatus, ShadowResult
from recsys_operator.launchers.prometheus import prometheus_process, prometheus_url
from recsys_operator.rollout.shadow_analysis import PrometheusShadowSource

USERS = [f"u{i}" for i in range(30)]


def test_mirrored_requests_are_compared_and_never_shown(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    document = routing_document(serving, canary="2", weight=0)
    document["shadowPercent"] = 100
    gateway = start_gateway(document)
    for user in USERS:
        body = http.post(f"{gateway.url}/v1/recommend", json={"user_id": user}, timeout=10).json()
        assert (body["variant"], body["model_version"]) == ("stable", "1")  # users see stable

    def text() -> str:
        return http.get(f"{gateway.url}/metrics", timeout=10).text

    wait_until(
        lambda: (
            metric_value(text(), "recsys_gateway_shadow_requests_total", outcome="compared")
            == len(USERS)
        )
    )
    assert {version for version, _ in serving.requests} == {"1", "2"}  # the canary was called
    expected = sum(
        overlap(stub_items("1", u, 10, set()), stub_items("2", u, 10, set())) for u in USERS
    )
    got = metric_value(
        text(), "recsys_gateway_shadow_overlap_sum", system=SYSTEM, model_version="2"
    )
    assert abs(got - expected) < 1e-9
    # Nothing of the shadow reaches the canary's analysis counters.
    assert metric_value(text(), "recsys_impressions_total", variant="canary") == 0
    assert metric_value(text(), "recsys_gateway_requests_total", variant="canary") == 0


def test_a_failing_canary_is_counted_and_the_user_is_served(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    serving.set("2", status=500)
    document = routing_document(serving, canary="2", weight=0)
    document["shadowPercent"] = 100
    gateway = start_gateway(document)
    answer = http.post(f"{gateway.url}/v1/recommend", json={"user_id": "u1"}, timeout=10)
    assert answer.status_code == 200 and answer.json()["fallback"] is False
    wait_until(
        lambda: (
            metric_value(
                http.get(f"{gateway.url}/metrics", timeout=10).text,
                "recsys_gateway_shadow_requests_total",
                outcome="failed",
            )
            == 1
        )
    )


def test_without_shadow_percent_nothing_is_mirrored(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving, canary="2", weight=0))
    http.post(f"{gateway.url}/v1/recommend", json={"user_id": "u1"}, timeout=10)
    assert {version for version, _ in serving.requests} == {"1"}


def test_predicted_ctr_follows_the_items_clicks() -> None:
    items = ItemCtr()
    for _ in range(100):
        items.shown(["a", "b"])
    for _ in range(50):
        items.clicked("a")
    assert items.overall == 50 / 200
    # a: 50 clicks in 100 impressions, pulled slightly to the overall 0.25; b: 0 of 100.
    assert items.predicted(["a"]) == (50 + 20 * 0.25) / 120
    assert items.predicted(["a"]) > items.predicted(["never-shown"]) > items.predicted(["b"])
    assert items.predicted(["never-shown"]) == 0.25
    assert overlap(["a", "b"], ["b", "c"]) == 0.5 and overlap([], []) == 1.0


@pytest.mark.prometheus
def test_the_rollouts_shadow_source_reads_the_comparisons_from_prometheus(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session, tmp_path: Path
) -> None:
    """The whole path: gateway metrics -> a real Prometheus -> the shadow judgement."""
    document = routing_document(serving, canary="2", weight=0)
    document["shadowPercent"] = 100
    gateway = start_gateway(document)
    target = gateway.url.removeprefix("http://")
    prometheus = prometheus_process(tmp_path, [target]).start(ready_timeout=60)
    try:
        spec = ShadowSpec(duration="1m", minRequests=20, minOverlap=0.0, minPredictedCtrRatio=0.0)
        source = PrometheusShadowSource(prometheus_url(prometheus), SYSTEM, spec)
        canary = CanaryStatus(version="2", phase="Shadow")
        # increase() counts from a series' first scrape: warm the series up first, so
        # that the 40 requests judged below all fall after it.
        http.post(f"{gateway.url}/v1/recommend", json={"user_id": "warm-up"}, timeout=10)
        seen = 'recsys_gateway_shadow_overlap_count{model_version="2"}'
        wait_until(lambda: source._scalar(seen) == 1.0, timeout=30, interval=0.5)
        for i in range(40):
            http.post(f"{gateway.url}/v1/recommend", json={"user_id": f"u{i}"}, timeout=10)

        expected = (
            sum(
                overlap(stub_items("1", f"u{i}", 10, set()), stub_items("2", f"u{i}", 10, set()))
                for i in range(40)
            )
            / 40
        )

        def judged_on_everything() -> ShadowResult | None:
            # Until the last scrape has all 40, the mean is over the ones scraped so far;
            # then it is theirs, up to increase()'s extrapolation (a few percent).
            result = asyncio.run(source(canary, 60))
            mean, compared = result.mean_overlap, result.compared or 0
            close = mean is not None and abs(mean - expected) <= 0.05 * expected
            return result if compared >= 38 and close else None

        result = wait_until(judged_on_everything, timeout=40, interval=1)
    finally:
        prometheus.stop()
    assert result.decision is AnalysisDecision.PASS, result.reason
    assert result.compared is not None and result.compared >= 38 and result.failed == 0
