"""The user event: what clients send on the interactions topic (keyed by user id).

One event is one thing a user did with one item, here in its JSON form (on the wire
it is Avro or JSON: `recsys_contracts.event_wire` encodes and decodes both)::

    {"event_id": "5f0c...", "user_id": "u42", "item_id": "i7", "type": "click",
     "ts": 1767225600000, "dwell_ms": null, "request_id": "r-1", "model_version": "v3"}

`ts` is the time of the action in Unix epoch milliseconds, set by the client.
`event_id` makes processing idempotent: Pulsar delivers at least once, so the
same event may arrive twice and must count once. Unknown fields are ignored so
that producers can add fields before consumers know them (a tolerant reader);
a known field with a wrong value is an error with a reason that names it.
"""

from __future__ import annotations

import json
import time
import uuid
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from recsys_contracts.model_version import MODEL_VERSION_PATTERN

# Braces would break the Redis Cluster hash tag `{<user>}` in the feature keys;
# control characters and whitespace are never meant and make keys unreadable; invisible
# and bidirectional-formatting characters (soft hyphen, zero-width, LRM/RLM, embeddings,
# overrides, isolates, BOM) make two ids that look the same differ, or one look like
# another (Trojan Source), so they are refused too.
_NOT_IN_IDS = (
    r"\s\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e"
    r"\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
)
USER_ID_PATTERN = rf"^[^{{}}{_NOT_IN_IDS}]{{1,256}}$"
ID_PATTERN = rf"^[^{_NOT_IN_IDS}]{{1,256}}$"
# Below this an epoch-millisecond value is before 1973: almost surely seconds sent by mistake.
MIN_TS_MS = 100_000_000_000
# Every reader of events says so (the event contract, the gateway).
TS_BELOW_MIN = "must be Unix epoch milliseconds (this looks like seconds or is too early)"


class EventType(StrEnum):
    VIEW = "view"
    CLICK = "click"
    PURCHASE = "purchase"
    DWELL = "dwell"
    IMPRESSION = "impression"


# Impressions record what was shown, not what the user touched: they are counted,
# but they do not enter the recent items or move the user's embedding.
INTERACTION_TYPES = frozenset(t for t in EventType if t is not EventType.IMPRESSION)

TimestampMs = Annotated[StrictInt, Field(ge=MIN_TS_MS, le=10**14)]


class Event(BaseModel):
    """One user event as it travels on the wire."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: str = Field(pattern=ID_PATTERN)
    user_id: str = Field(pattern=USER_ID_PATTERN)
    item_id: str = Field(pattern=ID_PATTERN)
    type: EventType
    ts: TimestampMs
    dwell_ms: Annotated[StrictInt, Field(ge=0, le=86_400_000)] | None = None
    request_id: str | None = Field(default=None, max_length=256)
    model_version: str | None = Field(default=None, pattern=MODEL_VERSION_PATTERN)

    @model_validator(mode="after")
    def _dwell_has_duration(self) -> Self:
        if self.type is EventType.DWELL and self.dwell_ms is None:
            raise ValueError("a dwell event needs dwell_ms")
        return self

    def to_json(self) -> bytes:
        """The JSON form (UTF-8, unset optional fields omitted); producers encode with
        `recsys_contracts.event_wire.encode_event`, Avro by default."""
        return self.model_dump_json(exclude_none=True).encode()

    @property
    def is_interaction(self) -> bool:
        return self.type in INTERACTION_TYPES


class InvalidEvent(ValueError):
    """A payload that is not a valid event; `code` is short and stable (a metric label)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def parse_event(payload: bytes | str) -> Event:
    """The event in `payload`, or InvalidEvent saying what is wrong with it."""
    try:
        return Event.model_validate_json(payload)
    except ValidationError as exc:
        raise InvalidEvent(_error_code(exc), _describe(exc)) from None


def event_from_record(record: dict[str, Any]) -> Event:
    """The event in an already-decoded JSON object, or InvalidEvent."""
    try:
        return Event.model_validate(record)
    except ValidationError as exc:
        raise InvalidEvent(_error_code(exc), _describe(exc)) from None


def _error_code(exc: ValidationError) -> str:
    if any(e["type"] in ("json_invalid", "json_type") for e in exc.errors()):
        return "not_json"
    if any(e["type"] == "model_type" for e in exc.errors()):
        return "not_an_object"
    return "invalid_field"


def _describe(exc: ValidationError) -> str:
    """One line per problem: `field: message` (pydantic's own text is long and nested)."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"]
        if error["type"] == "string_pattern_mismatch":
            message = (
                "contains characters not allowed here "
                "(braces, spaces, control, invisible or bidi characters)"
            )
            if where == "model_version":
                message = "must match " + MODEL_VERSION_PATTERN
        if error["type"] == "greater_than_equal" and where == "ts":
            message = TS_BELOW_MIN
        if error["type"] == "value_error":
            message = str(error.get("ctx", {}).get("error", message))
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


# The bounds on an event's time relative to the receiver's clock: the gateway refuses
# (4xx) what the feature job would dead-letter, with these same defaults.
MAX_FUTURE_MS = 5 * 60_000
MAX_PAST_MS = 7 * 86_400_000


def check_event_time(
    event: Event, now_ms: int, max_future_ms: int = MAX_FUTURE_MS, max_past_ms: int = MAX_PAST_MS
) -> None:
    """Raise InvalidEvent for an event from the future or the far past.

    One from the future (a client clock far ahead) would move the user's clock
    forward, empty every window and make all later real events look late; one from
    the far past (a wrong clock, seconds for milliseconds) would start a session in
    1973 and add decades to the freshness histogram. Both are refused instead.
    """
    check_event_ts(event.ts, now_ms, max_future_ms, max_past_ms)


def check_event_ts(
    ts: int, now_ms: int, max_future_ms: int = MAX_FUTURE_MS, max_past_ms: int = MAX_PAST_MS
) -> None:
    """`check_event_time` for a bare `ts` (the gateway checks before it builds the event)."""
    if ts > now_ms + max_future_ms:
        ahead = (ts - now_ms) / 1000
        raise InvalidEvent("future_ts", f"ts: {ahead:.0f}s in the future (client clock ahead?)")
    if ts < now_ms - max_past_ms:
        behind = (now_ms - ts) / 86_400_000
        raise InvalidEvent(
            "past_ts",
            f"ts: {behind:.1f} days in the past (older than {max_past_ms // 86_400_000}d)",
        )


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_event(
    user_id: str,
    item_id: str,
    type: EventType | str,
    *,
    ts: int | None = None,
    dwell_ms: int | None = None,
    request_id: str | None = None,
    model_version: str | None = None,
) -> Event:
    """An event with a fresh random `event_id` and, unless given, the current time."""
    return Event(
        event_id=uuid.uuid4().hex,
        user_id=user_id,
        item_id=item_id,
        type=EventType(type),
        ts=now_ms() if ts is None else ts,
        dwell_ms=dwell_ms,
        request_id=request_id,
        model_version=model_version,
    )


def fill_missing(record: dict[str, Any], at_ms: int) -> dict[str, Any]:
    """`record` with a random `event_id` and `ts` = `at_ms` where they are absent.

    For scripts that send hand-written events. Re-sending the same filled record
    gives it a new id, so it counts again: fill once, keep the result.
    """
    filled = dict(record)
    filled.setdefault("event_id", uuid.uuid4().hex)
    filled.setdefault("ts", at_ms)
    return filled


def parse_json_object(line: str) -> dict[str, Any]:
    """The JSON object on one input line, or InvalidEvent."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidEvent("not_json", f"not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise InvalidEvent("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    return value
