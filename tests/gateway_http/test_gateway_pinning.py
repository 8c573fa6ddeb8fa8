"""QA pinning over real HTTP: `X-Recsys-Variant` or the `recsys_variant` cookie sends a
request to the variant it names, and nothing about it reaches the analysis counters."""

from __future__ import annotations

from typing import Any

import requests
from gateway_testing import SYSTEM, StartGateway, metric_value, routing_document
from serving_stub import ServingStub

from gateway.attribution import parse_request_id
from recsys_contracts.events import now_ms
from recsys_contracts.variant_assignment import Variant, assign_variant

ANALYSED = (
    "recsys_impressions_total",
    "recsys_clicks_total",
    "recsys_gateway_requests_total",
    "recsys_gateway_request_duration_seconds_count",
)


def stable_user(salt: str, weight: int) -> str:
    """A user the hash keeps on stable at this weight."""
    return next(
        f"u{i}" for i in range(1000) if assign_variant(salt, f"u{i}", weight) is Variant.STABLE
    )


def recommend(http: requests.Session, url: str, user: str, **kwargs: Any) -> requests.Response:
    return http.post(f"{url}/v1/recommend", json={"user_id": user}, timeout=10, **kwargs)


def analysed(http: requests.Session, url: str) -> dict[str, float]:
    text = http.get(f"{url}/metrics", timeout=10).text
    return {name: metric_value(text, name, system=SYSTEM) for name in ANALYSED}


def test_a_pinned_request_is_served_by_its_variant_and_kept_out_of_the_analysis(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving, canary="2", weight=10))
    user = stable_user("recs:1", 10)
    before = analysed(http, gateway.url)

    pinned = recommend(http, gateway.url, user, headers={"X-Recsys-Variant": "canary"})
    body = pinned.json()
    assert pinned.status_code == 200 and (body["variant"], body["model_version"]) == ("canary", "2")
    assert body["pinned"] is True
    assert serving.requests[-1][0] == "2"  # the canary's model answered
    served = parse_request_id(body["request_id"])
    assert served.pinned and served.variant is Variant.CANARY
    # Now: the gateway refuses events more than MAX_PAST_MS old (recsys_contracts.events).
    click = {"user_id": user, "item_id": body["item_ids"][0], "type": "click", "ts": now_ms()}
    sent = http.post(f"{gateway.url}/v1/events", json={**click, "request_id": body["request_id"]})
    assert sent.status_code == 202

    # Nothing the analysis reads moved; the pinned counters did.
    assert analysed(http, gateway.url) == before
    text = http.get(f"{gateway.url}/metrics", timeout=10).text
    assert (
        metric_value(text, "recsys_gateway_pinned_requests_total", variant="canary", code="200")
        == 1
    )
    assert metric_value(text, "recsys_gateway_pinned_clicks_total", model_version="2") == 1

    # Unpinned, the same user is on stable and counted as usual.
    plain = recommend(http, gateway.url, user).json()
    assert (plain["variant"], plain["pinned"]) == ("stable", False)
    after = analysed(http, gateway.url)
    assert after["recsys_impressions_total"] == before["recsys_impressions_total"] + 1


def test_the_cookie_pins_too_and_the_header_wins(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving, canary="2", weight=90))
    user = stable_user("recs:1", 90)
    by_cookie = recommend(http, gateway.url, user, cookies={"recsys_variant": "canary"}).json()
    assert (by_cookie["variant"], by_cookie["pinned"]) == ("canary", True)
    both = recommend(
        http,
        gateway.url,
        user,
        headers={"X-Recsys-Variant": "stable"},
        cookies={"recsys_variant": "canary"},
    ).json()
    assert (both["variant"], both["model_version"]) == ("stable", "1")


def test_bad_pins_are_client_errors(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving))  # no canary
    wrong = recommend(http, gateway.url, "u1", headers={"X-Recsys-Variant": "blue"})
    assert wrong.status_code == 400
    assert wrong.json()["error"] == "X-Recsys-Variant: must be stable or canary, got 'blue'"
    missing = recommend(http, gateway.url, "u1", headers={"X-Recsys-Variant": "canary"})
    assert missing.status_code == 409 and "no canary" in missing.json()["error"]
    stable = recommend(http, gateway.url, "u1", headers={"X-Recsys-Variant": "stable"})
    assert stable.status_code == 200 and stable.json()["pinned"] is True
