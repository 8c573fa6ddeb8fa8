"""`/openapi.json`: the OpenAPI 3.1 document of the gateway, built from the pydantic
models in `gateway.api_models` so that it always says what the code validates."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from gateway.api_models import (
    MAX_EVENTS_PER_REQUEST,
    ClientEvent,
    ErrorResponse,
    EventsAccepted,
    Health,
    RecommendRequest,
    RecommendResponse,
)

_REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: tuple[int, str]) -> dict[str, Any]:
    return {str(status): _json(_ref("ErrorResponse"), text) for status, text in statuses}


BAD_INPUT = (
    (400, "The body is not JSON."),
    (422, "The body is JSON but not a valid request; `field` names the culprit."),
)


def build_openapi(version: str = "0") -> dict[str, Any]:
    _, schemas = models_json_schema(
        [
            (RecommendRequest, "validation"),
            (ClientEvent, "validation"),
            (RecommendResponse, "serialization"),
            (EventsAccepted, "serialization"),
            (ErrorResponse, "serialization"),
            (Health, "serialization"),
        ],
        ref_template=_REF,
    )
    one_or_many_events = {
        "oneOf": [
            _ref("ClientEvent"),
            {
                "type": "array",
                "items": _ref("ClientEvent"),
                "minItems": 1,
                "maxItems": MAX_EVENTS_PER_REQUEST,
            },
        ]
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "recsys gateway",
            "version": version,
            "description": (
                "The only service clients of a recommender system call: recommendations "
                "from the user's sticky model variant, and the interaction events that "
                "measure them. See docs/gateway.md."
            ),
        },
        "paths": {
            "/v1/recommend": {
                "post": {
                    "operationId": "recommend",
                    "summary": "Top-k items for a user",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("RecommendRequest")}},
                    },
                    "responses": {
                        "200": _json(
                            _ref("RecommendResponse"),
                            "Recommendations; `fallback` is true when serving failed and popular items were returned.",
                        ),
                        **_errors(
                            *BAD_INPUT,
                            (503, "Serving failed and there are no fallback items yet."),
                        ),
                    },
                }
            },
            "/v1/events": {
                "post": {
                    "operationId": "events",
                    "summary": "Record one interaction or a list of them",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": one_or_many_events}},
                    },
                    "responses": {
                        "202": _json(_ref("EventsAccepted"), "Queued for the event stream."),
                        **_errors(*BAD_INPUT),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "responses": {"200": _json(_ref("Health"), "The routing applied now.")},
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "responses": {"200": _json({"type": "object"}, "This document.")},
                }
            },
        },
        "components": {"schemas": schemas["$defs"]},
    }
