"""The gateway in front of a real TorchServe serving two versions of a real (tiny)
two-tower + FAISS model archive, built with the project's own trainer and archiver."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from gateway_testing import StartGateway, metric_value

from gateway.attribution import parse_request_id
from recsys_contracts.variant_assignment import Variant, assign_variant
from recsys_operator.launchers.torchserve import LocalTorchServe, torchserve_server

pytestmark = [pytest.mark.java, pytest.mark.slow, pytest.mark.xdist_group("gateway-torchserve")]

MODEL = "recs"
HANDLER_TOP_K = 20


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTorchServe]:
    from tiny_model import TinyModel, pack

    from recsys_operator.api.recommender_system import ServingSpec

    root = tmp_path_factory.mktemp("torchserve")
    model_dir = TinyModel().write(root / "model")  # 300 items, 16-d, Flat
    store = pack({"1": model_dir, "2": model_dir}, root / "store", name=MODEL, top_k=HANDLER_TOP_K)
    server = torchserve_server(
        root / "run",
        model=store.model_spec("2"),
        serving=ServingSpec(),
        model_store=store.path,
        versions=["1", "2"],
    )
    server.start(timeout=180)
    yield server
    server.stop()


def routing_for(
    torchserve: LocalTorchServe, *, canary: str = "2", weight: int = 50
) -> dict[str, object]:
    return {
        "system": "shop.recs",
        "stable": {"version": "1", "url": torchserve.predictions_url("1")},
        "canary": {"version": canary, "url": torchserve.predictions_url(canary)},
        "canaryWeight": weight,
        "salt": "recs:2",
        "timeoutMs": 2000,  # two shared cores: generous, the test is about routing
        "defaultK": 10,
        "maxK": 50,  # above the handler's 20, so the handler's own refusal can be seen
        "pulsarServiceUrl": None,
    }


def test_users_reach_the_version_they_are_assigned(
    torchserve: LocalTorchServe, start_gateway: StartGateway, http: requests.Session
) -> None:
    gateway = start_gateway(routing_for(torchserve))
    for n in range(16):
        user = f"u{n}"
        body = http.post(
            f"{gateway.url}/v1/recommend", json={"user_id": user, "k": 5}, timeout=10
        ).json()
        expected = assign_variant("recs:2", user, 50)
        assert body["variant"] == expected.value
        assert body["model_version"] == ("2" if expected is Variant.CANARY else "1")
        assert parse_request_id(body["request_id"]).model_version == body["model_version"]
        assert body["fallback"] is False
        assert len(body["item_ids"]) == len(body["scores"]) == 5
    metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
    assert metric_value(metrics, "recsys_gateway_requests_total", model_version="1", code="200") > 0
    assert metric_value(metrics, "recsys_gateway_requests_total", model_version="2", code="200") > 0


def test_the_handlers_refusal_is_passed_on_and_a_missing_version_falls_back(
    torchserve: LocalTorchServe,
    start_gateway: StartGateway,
    http: requests.Session,
    tmp_path: Path,
) -> None:
    gateway = start_gateway(routing_for(torchserve, weight=0))
    refused = http.post(f"{gateway.url}/v1/recommend", json={"user_id": "u1", "k": 30}, timeout=10)
    assert refused.status_code == 400
    assert "k must be between 1 and 20" in refused.json()["error"]

    # A canary version TorchServe has not loaded: its 404 is not the client's fault.
    popular = tmp_path / "popular.json"
    popular.write_text(json.dumps([f"i{n:03d}" for n in range(10)]))
    gateway = start_gateway(
        routing_for(torchserve, canary="3", weight=100), fallback_items_path=popular
    )
    body = http.post(
        f"{gateway.url}/v1/recommend", json={"user_id": "u1", "k": 5}, timeout=10
    ).json()
    assert body["fallback"] is True and body["variant"] == "canary"
    assert body["item_ids"] == ["i000", "i001", "i002", "i003", "i004"]
    metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
    assert (
        metric_value(
            metrics, "recsys_gateway_fallbacks_total", reason="unexpected_status", model_version="3"
        )
        == 1
    )
