"""The bodies the gateway accepts and answers with.

These pydantic models are the one description of the HTTP API: requests are
validated with them and `gateway.openapi` builds `/openapi.json` from their JSON
schemas, so the document cannot drift from what the code does.

Validation is strict (a JSON string is never taken for a number, unknown fields
are refused), and the limits on ids and lists are the serving handler's own, so a
request the gateway accepts is never refused by TorchServe for its shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from gateway.attribution import REQUEST_ID_PATTERN
from recsys_contracts.events import ID_PATTERN, MIN_TS_MS, USER_ID_PATTERN
from recsys_contracts.retrieval_request import MAX_ID_LENGTH, MAX_LIST_LENGTH
from recsys_contracts.variant_assignment import Variant

# Ids as the event contract allows them (what the gateway accepts must also be a valid
# event downstream), within the handler's length limit.
UserId = Annotated[str, StringConstraints(pattern=USER_ID_PATTERN, max_length=MAX_ID_LENGTH)]
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN, max_length=MAX_ID_LENGTH)]
IdList = Annotated[list[Id], Field(max_length=MAX_LIST_LENGTH)]
MAX_TS_MS = 10**14  # the event contract's bound

# What a pattern means, for error messages (pydantic would quote the regex).
PATTERN_MEANINGS = {
    USER_ID_PATTERN: "1 to 256 characters without whitespace, braces, control, invisible or bidi characters",
    ID_PATTERN: "1 to 256 characters without whitespace, control, invisible or bidi characters",
    REQUEST_ID_PATTERN: "a request_id this gateway issued (<64 hex digits>.<stable|canary|pinned-stable|pinned-canary>.<model_version>)",
}

# Events: at most this many in one POST /v1/events.
MAX_EVENTS_PER_REQUEST = 1000
# One day; longer dwell times are a client bug, not a signal.
MAX_DWELL_MS = 86_400_000


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", use_attribute_docstrings=True)


class _Response(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)


class RecommendRequest(_Request):
    """POST /v1/recommend."""

    user_id: UserId
    """Who the recommendations are for; also decides the user's variant (sticky)."""
    k: int | None = Field(default=None, ge=1)
    """How many items; default `defaultK` of the routing, at most its `maxK` (larger is a 422)."""
    exclude_item_ids: IdList = Field(default_factory=list)
    """Items not to recommend (e.g. already bought)."""
    recent_item_ids: IdList = Field(default_factory=list)
    """The user's latest items, newest first, for session-aware retrieval."""
    context: dict[str, Any] | None = None
    """Free-form client context (page, device...). Not sent to the model today."""


class RecommendResponse(_Response):
    """The answer to POST /v1/recommend."""

    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    """Opaque to clients: send it back with the events about these items."""
    model_version: str
    """The model version that ranked the items, or `fallback`."""
    variant: Variant
    """The user's variant: `stable` or `canary`."""
    item_ids: list[str]
    """Recommended items, best first."""
    scores: list[float]
    """One score per item, same order."""
    fallback: bool = False
    """True when serving failed and the items are the popularity fallback."""
    pinned: bool = False
    """True when the variant was chosen by the `X-Recsys-Variant` header or `recsys_variant` cookie (QA); such answers are not counted in the rollout analysis."""


class ClientEvent(_Request):
    """One user interaction sent to POST /v1/events."""

    model_config = ConfigDict(
        # What `_dwell_has_a_duration` checks, said in the schema too.
        json_schema_extra={
            "if": {"properties": {"type": {"const": "dwell"}}},
            "then": {"required": ["dwell_ms"], "properties": {"dwell_ms": {"type": "integer"}}},
        }
    )

    type: Literal["view", "click", "purchase", "dwell"]
    user_id: UserId
    item_id: Id
    request_id: str | None = Field(default=None, pattern=REQUEST_ID_PATTERN)
    """The `request_id` of the recommendation the interaction came from, if any; a click
    carrying it is attributed to the variant and model version that served it."""
    dwell_ms: int | None = Field(default=None, ge=0, le=MAX_DWELL_MS, validate_default=True)
    """Time spent on the item, for `dwell` events (required there)."""
    ts: int | None = Field(default=None, ge=MIN_TS_MS, le=MAX_TS_MS)
    """When it happened, Unix time in milliseconds; default: when the gateway received it."""
    event_id: Id | None = None
    """Unique id for idempotent retries; default: a fresh one."""

    @field_validator("dwell_ms")
    @classmethod
    def _dwell_has_a_duration(cls, dwell_ms: int | None, info: ValidationInfo) -> int | None:
        # A field validator (not a model one) so that the error names the field.
        if dwell_ms is None and info.data.get("type") == "dwell":
            raise ValueError("a dwell event needs dwell_ms")
        return dwell_ms


ClientEvents = Annotated[list[ClientEvent], Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)]


class EventsAccepted(_Response):
    """The answer to POST /v1/events: the events are queued for Pulsar."""

    accepted: int


class ErrorResponse(_Response):
    """Every 4xx and 5xx the gateway answers itself."""

    error: str
    """What is wrong, for a human."""
    field: str | None = None
    """The request field at fault (e.g. `k`, `[2].type`), or null for the whole body."""


class Health(_Response):
    """GET /healthz: the routing this replica applies right now."""

    status: Literal["ok"]
    system: str
    stable_version: str
    canary_version: str | None
    canary_weight: int
    salt: str
