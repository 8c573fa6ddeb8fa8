"""/openapi.json describes the API the code validates, and schemathesis, fed with it,
finds no 5xx and no answer that breaks the document (bounded, reproducible examples)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from gateway_testing import StartGateway, routing_document
from hypothesis import HealthCheck, given, settings
from serving_stub import ServingStub

from gateway.api_models import ClientEvent, RecommendRequest
from gateway.openapi import build_openapi
from gateway.server import GatewayThread
from recsys_operator import __version__

EXAMPLES_PER_OPERATION = 15


@pytest.fixture
def gateway(serving: ServingStub, start_gateway: StartGateway) -> Iterator[GatewayThread]:
    yield start_gateway(routing_document(serving, canary="2", weight=50))


def test_the_document_lists_exactly_the_api_and_comes_from_the_models(
    gateway: GatewayThread, http: requests.Session
) -> None:
    document = http.get(f"{gateway.url}/openapi.json", timeout=10).json()
    assert document == build_openapi(__version__)
    assert document["openapi"].startswith("3.")
    operations = {(path, method) for path, item in document["paths"].items() for method in item}
    assert operations == {
        ("/v1/recommend", "post"),
        ("/v1/events", "post"),
        ("/healthz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
    }
    schemas = document["components"]["schemas"]
    ref = "#/components/schemas/{model}"
    assert schemas["RecommendRequest"] == RecommendRequest.model_json_schema(ref_template=ref)
    assert schemas["ClientEvent"] == ClientEvent.model_json_schema(ref_template=ref)


@pytest.mark.parametrize(
    ("path", "method", "mode"),
    [
        ("/v1/recommend", "POST", "positive"),
        ("/v1/recommend", "POST", "negative"),
        ("/v1/events", "POST", "positive"),
        ("/v1/events", "POST", "negative"),
        # No parameters, so nothing negative to send.
        ("/healthz", "GET", "positive"),
        ("/metrics", "GET", "positive"),
    ],
)
def test_schemathesis_finds_no_server_error(
    gateway: GatewayThread, http: requests.Session, path: str, method: str, mode: str
) -> None:
    # Imported here, not at the top: schemathesis is large, and pytest (re)writes the
    # asserts of every module it imports; only the worker that runs this should pay.
    import schemathesis
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    operation = schema[path][method]
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    if mode == "negative":
        checks.append(negative_data_rejection)  # invalid input must be refused with a 4xx

    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,  # the same examples on every run: no flaky CI
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(base_url=gateway.url, session=http, checks=checks)

    run()
