"""Client mistakes in how a body is sent are 4xx answers, counted, never 500s."""

from __future__ import annotations

import gzip
import json
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests
from gateway_testing import StartGateway, metric_value, routing_document
from serving_stub import ServingStub

from gateway.api_models import ErrorResponse

EVENT = {"type": "view", "user_id": "u", "item_id": "i"}
ASK = {"user_id": "u", "k": 2}


def post(http: requests.Session, url: str, body: bytes, **headers: str) -> requests.Response:
    return http.post(url, data=body, headers=headers, timeout=10)


@pytest.mark.parametrize("path", ["/v1/recommend", "/v1/events"])
@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Content-Encoding": "gzip"}, b'{"user_id": "u"}', 400),  # claims gzip, is plain
        ({"Content-Encoding": "deflate"}, b'{"user_id": "u"}', 400),
        ({"Content-Encoding": "compress"}, b'{"user_id": "u"}', 415),
        ({"Content-Type": "text/plain"}, b'{"user_id": "u"}', 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"user_id=u", 415),
        ({"Content-Type": "application/json"}, b'{"user_id": "u", "user_id": "v"}', 400),
    ],
)
def test_a_body_sent_wrong_is_a_4xx_with_a_reason(
    serving: ServingStub,
    start_gateway: StartGateway,
    http: requests.Session,
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
) -> None:
    gateway = start_gateway(routing_document(serving))
    if path == "/v1/events":
        body = body.replace(b'"user_id": "u"', b'"type": "view", "item_id": "i", "user_id": "u"')
    answer = post(http, gateway.url + path, body, **headers)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]
    assert not serving.requests
    if path == "/v1/recommend":
        metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
        assert metric_value(metrics, "recsys_gateway_requests_total", code=str(status)) == 1


def test_the_servers_refusals_have_the_shape_of_the_apps_errors(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    # The HTTP server writes its own refusals (`error_body`, without the app's models): a
    # client must read them as the app's ErrorResponse, down to the bytes' layout.
    gateway = start_gateway(routing_document(serving))
    from_server = http.get(f"{gateway.url}/nowhere", timeout=10)
    from_app = post(http, f"{gateway.url}/v1/recommend", b'{"user_id": ')  # not JSON
    assert (from_server.status_code, from_app.status_code) == (404, 400)
    for answer in (from_server, from_app):
        body = answer.json()
        assert list(body) == list(ErrorResponse.model_fields)
        assert isinstance(body["error"], str) and body["error"] and body["field"] is None
        assert answer.content == ErrorResponse.model_validate(body).model_dump_json().encode()


def test_bodies_sent_right_are_accepted_however_encoded(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving))
    url = f"{gateway.url}/v1/recommend"
    plain = json.dumps(ASK).encode()
    assert post(http, url, plain).status_code == 200  # no Content-Type: read as JSON
    assert post(http, url, plain, **{"Content-Type": "application/json; charset=utf-8"}).ok
    assert post(http, url, plain, **{"Content-Type": "application/vnd.recs+json"}).ok
    assert post(http, url, gzip.compress(plain), **{"Content-Encoding": "gzip"}).ok
    events = json.dumps([EVENT, EVENT]).encode()
    answer = post(
        http, f"{gateway.url}/v1/events", gzip.compress(events), **{"Content-Encoding": "gzip"}
    )
    assert (answer.status_code, answer.json()) == (202, {"accepted": 2})


@pytest.mark.parametrize(
    "user_id",
    ["a\u200bb", "admin\u202e", "\ufeffu", "a\u00adb", "a\u2066b\u2069", "a\x85b"],
)
def test_invisible_and_bidi_characters_are_refused_in_ids(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session, user_id: str
) -> None:
    gateway = start_gateway(routing_document(serving))
    for path, body in (("/v1/recommend", ASK), ("/v1/events", EVENT)):
        answer = http.post(f"{gateway.url}{path}", json={**body, "user_id": user_id}, timeout=10)
        assert answer.status_code == 422 and answer.json()["field"] == "user_id", answer.text
    assert http.post(
        f"{gateway.url}/v1/recommend", json={**ASK, "user_id": "Jürgen-日本"}, timeout=10
    ).ok


def test_a_body_that_never_finishes_is_a_408_within_the_timeout(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving), body_read_timeout_s=1.0)
    where = urlsplit(gateway.url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as conn:
        started = time.monotonic()
        conn.sendall(
            b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"user_id": '
        )
        answer = conn.recv(4096)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert 0.9 <= waited < 5
    metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
    assert metric_value(metrics, "recsys_gateway_requests_total", code="408") == 1


def test_a_small_gzip_body_that_decodes_past_the_limit_is_a_413(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_document(serving))
    bomb = gzip.compress(b'{"user_id": "' + b"u" * (4 << 20) + b'"}')
    assert len(bomb) < 64 * 1024  # well under the 1 MiB limit as sent
    url = f"{gateway.url}/v1/recommend"
    answer = post(http, url, bomb, **{"Content-Encoding": "gzip"})
    assert answer.status_code == 413 and "1048576 bytes" in answer.json()["error"]
    assert not serving.requests
    metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
    assert metric_value(metrics, "recsys_gateway_requests_total", code="413") == 1
