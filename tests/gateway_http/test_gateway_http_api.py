"""The gateway over real HTTP on 127.0.0.1, in front of a stub of TorchServe's API."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from gateway_testing import (
    SYSTEM,
    StartGateway,
    metric_value,
    routing_document,
    wait_until,
    write_routing,
)
from prometheus_client.parser import text_string_to_metric_families
from serving_stub import ServingStub, stub_items

from gateway.attribution import parse_request_id
from gateway.metrics import LATENCY_BUCKETS_S
from recsys_contracts.metric_names import ANALYSIS_BUCKETS
from recsys_contracts.variant_assignment import Variant, analysis_bucket, assign_variant
from recsys_operator.launchers.process import free_port


def recommend(http: requests.Session, url: str, **body: Any) -> requests.Response:
    return http.post(f"{url}/v1/recommend", json=body, timeout=10)


def test_a_recommendation_names_its_version_variant_and_request(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving, default_k=10))
    answer = recommend(http, gateway.url, user_id="u1", recent_item_ids=["item-3"])
    assert answer.status_code == 200
    body = answer.json()
    assert body["item_ids"] == stub_items("1", "u1", 10, set())
    assert len(body["scores"]) == 10
    assert (body["model_version"], body["variant"], body["fallback"]) == ("1", "stable", False)
    assert parse_request_id(body["request_id"]).model_version == "1"
    assert serving.requests[-1] == ("1", {"user_id": "u1", "k": 10})

    body = recommend(http, gateway.url, user_id="u1", k=3, exclude_item_ids=["item-0"]).json()
    assert body["item_ids"] == stub_items("1", "u1", 3, {"item-0"})


def test_answers_are_attributed_to_the_version_that_served_them(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    # Right after a promotion the routing says stable is version 2, while some stable
    # pods still hold version 1 (stable is called without a version, as the operator
    # renders it): each answer, impression and latency goes to the version that served it.
    document = routing_document(serving, stable="2")
    document["stable"]["url"] = serving.default_url()
    gateway = start_gateway(document)
    serving.default_version = "1"  # a pod not rolled yet
    old = recommend(http, gateway.url, user_id="u1").json()
    serving.default_version = "2"  # a rolled pod
    new = recommend(http, gateway.url, user_id="u1").json()
    assert (old["model_version"], new["model_version"]) == ("1", "2")
    assert parse_request_id(old["request_id"]).model_version == "1"
    metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
    for version in ("1", "2"):
        assert metric_value(metrics, "recsys_impressions_total", model_version=version) == 1
        assert (
            metric_value(
                metrics, "recsys_gateway_requests_total", model_version=version, code="200"
            )
            == 1
        )


def test_the_best_score_of_each_model_answer_is_in_the_served_score_histogram(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving, default_k=10))
    for k in (10, 3):
        assert recommend(http, gateway.url, user_id="u1", k=k).status_code == 200
    metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
    # The stub's scores fall from 1.0: each answer's best is 1.0.
    labels = {"system": SYSTEM, "model_version": "1", "variant": "stable"}
    name = "recsys_served_top_score"
    assert metric_value(metrics, f"{name}_count", **labels) == 2
    assert metric_value(metrics, f"{name}_sum", **labels) == pytest.approx(2.0)
    assert metric_value(metrics, f"{name}_bucket", **labels, le="0.95") == 0
    assert metric_value(metrics, f"{name}_bucket", **labels, le="1.0") == 2


def test_each_user_stays_on_one_variant(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving, canary="2", weight=30, salt="s1"))
    for n in range(40):
        user = f"user-{n}"
        expected = assign_variant("s1", user, 30)
        for _ in range(2):
            body = recommend(http, gateway.url, user_id=user, k=2).json()
            assert body["variant"] == expected.value
            assert body["model_version"] == ("2" if expected is Variant.CANARY else "1")
            assert body["item_ids"] == stub_items(body["model_version"], user, 2, set())


@pytest.mark.parametrize(
    ("path", "raw", "status", "field"),
    [
        ("/v1/recommend", b"", 400, None),
        ("/v1/recommend", b"{user_id: u1}", 400, None),
        ("/v1/recommend", b"\xff\xfe", 400, None),
        ("/v1/recommend", b"[]", 422, None),
        ("/v1/recommend", b'{"k": 1}', 422, "user_id"),
        ("/v1/recommend", b'{"user_id": 5}', 422, "user_id"),
        ("/v1/recommend", b'{"user_id": "has space"}', 422, "user_id"),
        ("/v1/recommend", b'{"user_id": "u", "k": 0}', 422, "k"),
        ("/v1/recommend", b'{"user_id": "u", "k": 51}', 422, "k"),  # maxK of the routing
        ("/v1/recommend", b'{"user_id": "u", "k": "5"}', 422, "k"),
        ("/v1/recommend", b'{"user_id": "u", "k": 2.5}', 422, "k"),
        ("/v1/recommend", b'{"user_id": "u", "exclude_item_ids": "i1"}', 422, "exclude_item_ids"),
        ("/v1/recommend", b'{"user_id": "u", "recent_item_ids": ["ok", ""]}', 422, "recent_item_ids[1]"),
        ("/v1/recommend", b'{"user_id": "u", "context": []}', 422, "context"),
        ("/v1/recommend", b'{"user_id": "u", "userId": "u"}', 422, "userId"),
        ("/v1/events", b"", 400, None),
        ("/v1/events", b"[]", 422, None),
        ("/v1/events", b'{"user_id": "u", "item_id": "i"}', 422, "type"),
        ("/v1/events", b'{"type": "like", "user_id": "u", "item_id": "i"}', 422, "type"),
        ("/v1/events", b'[{"type": "view", "user_id": "u", "item_id": "i"}, {"type": "dwell", "user_id": "u", "item_id": "i"}]', 422, "[1].dwell_ms"),
        ("/v1/events", b'{"type": "click", "user_id": "u", "item_id": "i", "request_id": "r-1"}', 422, "request_id"),
        ("/v1/events", b'{"type": "view", "user_id": "u", "item_id": "i", "ts": 1767225600}', 422, "ts"),
        ("/v1/events", b'{"type": "view", "user_id": "u", "item_id": "i", "ts": 126230400000}', 422, "ts"),
        ("/v1/events", b'{"type": "view", "user_id": "u", "item_id": "i", "ts": 99999999999999}', 422, "ts"),
        ("/v1/events", b'[{"type": "view", "user_id": "u", "item_id": "i"}, {"type": "view", "user_id": "u", "item_id": "i", "ts": 126230400000}]', 422, "[1].ts"),
        ("/v1/events", b'{"type": "view", "user_id": "u", "item_id": "i", "model_version": "2"}', 422, "model_version"),
    ],
)  # fmt: skip
def test_client_mistakes_are_4xx_naming_the_field(
    serving: ServingStub,
    start_gateway: StartGateway,
    http: requests.Session,
    path: str,
    raw: bytes,
    status: int,
    field: str | None,
) -> None:
    gateway = start_gateway(routing_document(serving, max_k=50))
    answer = http.post(f"{gateway.url}{path}", data=raw, timeout=10)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["field"] == field
    assert body["error"]
    assert not serving.requests  # refused before anything was called


SECONDS_TS = {"type": "view", "user_id": "u", "item_id": "i", "ts": 1_767_225_600}


@pytest.mark.parametrize(
    ("body", "field"),
    [(SECONDS_TS, "ts"), ([{**SECONDS_TS, "ts": None}, SECONDS_TS], "[1].ts")],
    ids=["one", "list"],
)
def test_a_ts_in_seconds_is_refused_as_seconds(
    serving: ServingStub,
    start_gateway: StartGateway,
    http: requests.Session,
    body: Any,
    field: str,
) -> None:
    # A client that sends `date +%s` must read what it did wrong, not pydantic's bound.
    gateway = start_gateway(routing_document(serving))
    answer = http.post(f"{gateway.url}/v1/events", json=body, timeout=10)
    assert answer.status_code == 422, answer.text
    assert answer.json() == {
        "error": f"{field}: must be Unix epoch milliseconds (this looks like seconds or is too early)",
        "field": field,
    }


def test_a_refusal_by_the_model_reaches_the_client(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    serving.set("1", status=400, message="recent_item_ids: unknown item")
    gateway = start_gateway(routing_document(serving))
    answer = recommend(http, gateway.url, user_id="u1")
    assert answer.status_code == 400
    assert "recent_item_ids: unknown item" in answer.json()["error"]
    metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
    assert metric_value(metrics, "recsys_gateway_requests_total", variant="stable", code="400") == 1


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        ({"delay_s": 2.0}, "timeout"),
        ({"status": 503}, "server_error"),
        ({"status": 500}, "server_error"),
        ({"status": 404}, "unexpected_status"),  # a version that is not loaded
        (None, "connection"),
    ],
)
def test_serving_failures_are_answered_from_the_fallback(
    serving: ServingStub,
    start_gateway: StartGateway,
    http: requests.Session,
    tmp_path: Path,
    failure: dict[str, Any] | None,
    reason: str,
) -> None:
    popular = tmp_path / "popular.json"
    popular.write_text(json.dumps(["p1", "p2", "p3", "p4"]))
    document = routing_document(serving, timeout_ms=150)
    if failure is None:
        document["stable"]["url"] = f"http://127.0.0.1:{free_port()}/predictions/recs/1"
    else:
        serving.set("1", **failure)
    gateway = start_gateway(document, fallback_items_path=popular)

    started = time.monotonic()
    answer = recommend(http, gateway.url, user_id="u1", k=2, exclude_item_ids=["p1"])
    elapsed = time.monotonic() - started
    assert answer.status_code == 200
    body = answer.json()
    assert body["fallback"] is True
    assert body["item_ids"] == ["p2", "p3"]
    assert body["model_version"] == "fallback"
    assert parse_request_id(body["request_id"]).model_version == "fallback"
    assert elapsed < 1.0  # the 150 ms timeout held, not the 2 s the model took

    metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
    assert (
        metric_value(
            metrics,
            "recsys_gateway_fallbacks_total",
            reason=reason,
            variant="stable",
            model_version="1",
        )
        == 1
    )
    # Latency and requests stay with the version that failed; the impression goes to the fallback.
    assert (
        metric_value(metrics, "recsys_gateway_requests_total", model_version="1", code="200") == 1
    )
    assert metric_value(metrics, "recsys_impressions_total", model_version="fallback") == 1
    assert metric_value(metrics, "recsys_impressions_total", model_version="1") == 0
    # Popularity scores are not the model's: the served-score histogram (drift) skips them.
    assert metric_value(metrics, "recsys_served_top_score_count") == 0


def test_the_fallback_learns_and_is_503_before_it_knows_anything(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving))
    serving.set("1", status=503)
    answer = recommend(http, gateway.url, user_id="u1", k=3)
    assert answer.status_code == 503
    assert answer.json()["error"]
    assert answer.headers["Retry-After"]

    serving.set("1")
    served = recommend(http, gateway.url, user_id="u1", k=3).json()["item_ids"]
    serving.set("1", status=503)
    body = recommend(http, gateway.url, user_id="u2", k=3).json()
    assert body["fallback"] is True
    assert set(body["item_ids"]) == set(served)


def test_a_weight_change_and_a_rollback_reach_the_gateway_within_5_s(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    users = [f"user-{n}" for n in range(20)]
    gateway = start_gateway(routing_document(serving, canary="2", weight=0))

    def variants() -> set[str]:
        return {recommend(http, gateway.url, user_id=u, k=1).json()["variant"] for u in users}

    assert variants() == {"stable"}

    write_routing(gateway.gateway.routing.path, routing_document(serving, canary="2", weight=100))
    written = time.monotonic()
    wait_until(lambda: variants() == {"canary"}, timeout=5.0)
    weight_change_s = time.monotonic() - written

    write_routing(gateway.gateway.routing.path, routing_document(serving))  # rollback
    written = time.monotonic()
    wait_until(lambda: variants() == {"stable"}, timeout=5.0)
    assert http.get(f"{gateway.url}/healthz", timeout=10).json()["canary_version"] is None
    assert max(weight_change_s, time.monotonic() - written) < 5.0

    metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
    assert metric_value(metrics, "recsys_gateway_routing_reloads_total", result="ok") == 2


def test_a_broken_routing_file_keeps_the_last_good_routing(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving, canary="2", weight=100))
    gateway.gateway.routing.path.write_text('{"system": "shop.recs", "stable": ')
    metrics_url = f"{gateway.url}/metrics"
    wait_until(
        lambda: (
            metric_value(
                http.get(metrics_url, timeout=10).text,
                "recsys_gateway_routing_reloads_total",
                result="invalid",
            )
            == 1
        )
    )
    assert recommend(http, gateway.url, user_id="u1").json()["variant"] == "canary"
    assert http.get(f"{gateway.url}/healthz", timeout=10).json()["canary_weight"] == 100


def test_metrics_expose_the_latency_histogram_per_version(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving, canary="2", weight=50))
    for n in range(20):
        assert recommend(http, gateway.url, user_id=f"user-{n}", k=1).status_code == 200
    answer = http.get(f"{gateway.url}/metrics", timeout=10)
    assert answer.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    histogram = families["recsys_gateway_request_duration_seconds"]
    assert histogram.type == "histogram"
    buckets = [s for s in histogram.samples if s.name.endswith("_bucket")]
    assert {s.labels["variant"] for s in buckets} == {"stable", "canary"}
    assert {s.labels["model_version"] for s in buckets} == {"1", "2"}
    assert {s.labels["system"] for s in buckets} == {SYSTEM}
    bounds = {float(s.labels["le"]) for s in buckets}
    assert bounds == {*LATENCY_BUCKETS_S, float("inf")}
    assert min(bounds) == 0.001 and 2.0 in bounds
    counts = [s.value for s in histogram.samples if s.name.endswith("_count")]
    assert sum(counts) == 20
    impressions = families["recsys_impressions"]
    assert sum(s.value for s in impressions.samples if s.name.endswith("_total")) == 20


def test_clicks_count_for_the_version_that_served_them(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving, canary="2", weight=50, salt="s2"))
    by_variant: dict[str, str] = {}
    for n in range(40):
        body = recommend(http, gateway.url, user_id=f"user-{n}", k=1).json()
        by_variant.setdefault(body["variant"], body["request_id"])
    assert set(by_variant) == {"stable", "canary"}

    events = [
        {"type": "click", "user_id": "user-0", "item_id": "i", "request_id": by_variant["canary"]},
        {"type": "click", "user_id": "user-0", "item_id": "i", "request_id": by_variant["canary"]},
        {"type": "click", "user_id": "user-1", "item_id": "i", "request_id": by_variant["stable"]},
        {"type": "view", "user_id": "user-1", "item_id": "i", "request_id": by_variant["stable"]},
        {"type": "click", "user_id": "user-2", "item_id": "i"},  # nothing to attribute to
    ]
    answer = http.post(f"{gateway.url}/v1/events", json=events, timeout=10)
    assert (answer.status_code, answer.json()) == (202, {"accepted": 5})

    metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
    assert metric_value(metrics, "recsys_clicks_total", model_version="2", variant="canary") == 2
    assert metric_value(metrics, "recsys_clicks_total", model_version="1", variant="stable") == 1
    assert metric_value(metrics, "recsys_clicks_total") == 3


def test_outcomes_are_counted_per_user_bucket_for_the_serving_version(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving, canary="2", weight=50, salt="s3"))
    served = {}
    for n in range(30):
        body = recommend(http, gateway.url, user_id=f"user-{n}", k=1).json()
        served[f"user-{n}"] = body
    canary_user = next(u for u, b in served.items() if b["variant"] == "canary")
    stable_user = next(u for u, b in served.items() if b["variant"] == "stable")
    events = [
        {"type": "click", "user_id": canary_user, "item_id": "i",
         "request_id": served[canary_user]["request_id"]},
        {"type": "dwell", "user_id": canary_user, "item_id": "i", "dwell_ms": 2500,
         "request_id": served[canary_user]["request_id"]},
        {"type": "purchase", "user_id": stable_user, "item_id": "i",
         "request_id": served[stable_user]["request_id"]},
    ]  # fmt: skip
    assert http.post(f"{gateway.url}/v1/events", json=events, timeout=10).status_code == 202

    metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
    c_bucket, s_bucket = analysis_bucket(canary_user), analysis_bucket(stable_user)
    canary = {"model_version": "2", "variant": "canary"}
    assert metric_value(metrics, "recsys_clicks_total", **canary, bucket=c_bucket) == 1
    assert metric_value(metrics, "recsys_dwell_seconds_total", **canary, bucket=c_bucket) == 2.5
    assert (
        metric_value(
            metrics, "recsys_purchases_total", model_version="1", variant="stable", bucket=s_bucket
        )
        == 1
    )
    # Impressions per bucket add up to the per-version totals dashboards sum.
    canary_buckets = {analysis_bucket(u) for u, b in served.items() if b["variant"] == "canary"}
    per_bucket = sum(
        metric_value(metrics, "recsys_impressions_total", **canary, bucket=bucket)
        for bucket in canary_buckets
    )
    assert per_bucket == metric_value(metrics, "recsys_impressions_total", **canary)
    assert per_bucket == sum(b["variant"] == "canary" for b in served.values())
    # Every bucket exists (at zero or more) for both versions, bounded at 64 values.
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    labels = [s.labels for s in families["recsys_clicks"].samples if s.name.endswith("_total")]
    assert {(lab["model_version"], lab["bucket"]) for lab in labels} == {
        (v, str(b)) for v in ("1", "2") for b in range(ANALYSIS_BUCKETS)
    }


def test_a_forged_click_is_refused_counted_and_never_reaches_ctr(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving, canary="999", weight=50, salt="s3"))
    genuine = recommend(http, gateway.url, user_id="u", k=1).json()["request_id"]
    forged = "0" * 64 + ".canary.999"
    click = {"type": "click", "user_id": "u", "item_id": "i"}
    one = http.post(f"{gateway.url}/v1/events", json={**click, "request_id": forged}, timeout=10)
    assert one.status_code == 422 and one.json()["field"] == "request_id"
    batch = [{**click, "request_id": genuine}, {**click, "request_id": forged}]
    refused = http.post(f"{gateway.url}/v1/events", json=batch, timeout=10)
    assert refused.status_code == 422 and refused.json()["field"] == "[1].request_id"
    metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
    assert metric_value(metrics, "recsys_gateway_unverified_request_ids_total") == 2
    assert metric_value(metrics, "recsys_clicks_total") == 0  # the batch was refused whole
    accepted = http.post(
        f"{gateway.url}/v1/events", json={**click, "request_id": genuine}, timeout=10
    )
    assert accepted.status_code == 202
    metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
    assert metric_value(metrics, "recsys_clicks_total") == 1


def test_replicas_sharing_keys_verify_each_others_ids_across_a_rotation(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    old, new = b"o" * 32, b"n" * 32
    before = start_gateway(routing_document(serving), request_id_keys=(old,))
    after = start_gateway(routing_document(serving), request_id_keys=(new, old))
    request_id = recommend(http, before.url, user_id="u", k=1).json()["request_id"]
    click = {"type": "click", "user_id": "u", "item_id": "i", "request_id": request_id}
    assert http.post(f"{after.url}/v1/events", json=click, timeout=10).status_code == 202
    stranger = start_gateway(routing_document(serving), request_id_keys=(new,))
    assert http.post(f"{stranger.url}/v1/events", json=click, timeout=10).status_code == 422


def test_health_and_errors_of_the_http_layer_are_json(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving, canary="2", weight=25, salt="s9"))
    health = http.get(f"{gateway.url}/healthz", timeout=10)
    assert health.json() == {
        "status": "ok",
        "system": SYSTEM,
        "stable_version": "1",
        "canary_version": "2",
        "canary_weight": 25,
        "salt": "s9",
    }
    missing = http.get(f"{gateway.url}/v2/recommend", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]
    wrong_method = http.get(f"{gateway.url}/v1/recommend", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]
    assert "POST" in wrong_method.headers["Allow"]
    too_big = http.post(f"{gateway.url}/v1/events", data=b"[" + b" " * (2 << 20) + b"]", timeout=10)
    assert too_big.status_code == 413 and too_big.json()["error"]
