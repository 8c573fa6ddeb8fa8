"""The handler's request contract, checked strictly: a bad request is refused with a
reason (HTTP 400), never answered with a guess.

    {"user_id": "u42",                 # optional string
     "recent_item_ids": ["i1", "i2"],  # optional list of strings, newest first
     "k": 20,                          # optional integer in 1..max_k (default: max_k)
     "exclude_item_ids": ["i3"]}       # optional list of strings

Unknown fields are refused too, so a typo such as `userId` cannot silently turn a
personalised request into a popularity answer.

The gateway sends its deadline as a header, `X-Recsys-Deadline-Ms: <epoch ms>` (a header,
not a field, so a handler of an older release ignores it instead of refusing the
request). A request that arrives at the handler past it is not computed: it is answered
504 (`DEADLINE_STATUS`), which the gateway counts as a timeout. The clocks of gateway and
model server pods are assumed NTP-synchronised (milliseconds apart).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_LIST_LENGTH = 1000
MAX_ID_LENGTH = 256
FIELDS = ("user_id", "recent_item_ids", "k", "exclude_item_ids")
DEADLINE_HEADER = "X-Recsys-Deadline-Ms"
DEADLINE_STATUS = 504


class BadRequest(ValueError):
    """A request the handler refuses; `status` is the HTTP status to answer with."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class RetrievalRequest:
    user_id: str | None
    recent_item_ids: tuple[str, ...]
    k: int
    exclude_item_ids: tuple[str, ...]


def decode_body(raw: object, *, json_decoded: bool = False) -> object:
    """The JSON value of a request body as a server hands it over: bytes or text still to
    parse, or (`json_decoded`) a value the server already parsed from JSON."""
    if raw is None:
        raise BadRequest("the request has no body; send a JSON object")
    if json_decoded:
        return raw
    if isinstance(raw, bytes | bytearray):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the body is not UTF-8 text") from None
    if isinstance(raw, str):
        if not raw.strip():
            raise BadRequest("the request has no body; send a JSON object")
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BadRequest(
                f"the body is not valid JSON: {exc.msg} at position {exc.pos}"
            ) from None
    return raw


def deadline_passed(header_value: object, now_ms: int) -> bool:
    """Whether a request whose deadline header is `header_value` (None when absent) has
    outlived it. A value that is not an integer is ignored (the request is served): a
    garbled header must not turn into refused traffic."""
    if isinstance(header_value, bytes | bytearray):
        header_value = bytes(header_value).decode("ascii", errors="replace")
    if not isinstance(header_value, str) or not header_value.strip().isdigit():
        return False
    return int(header_value) <= now_ms


def parse_request(body: object, *, max_k: int) -> RetrievalRequest:
    """A checked request from a decoded JSON body; `BadRequest` says what is wrong."""
    if not isinstance(body, Mapping):
        raise BadRequest(f"the body must be a JSON object, got {_json_type(body)}")
    unknown = sorted(str(key) for key in body if key not in FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    user_id = body.get("user_id")
    if user_id is not None and not _is_id(user_id):
        raise BadRequest(
            f"user_id must be a non-empty string of at most {MAX_ID_LENGTH} characters, "
            f"got {_json_type(user_id)}"
        )
    k = body.get("k", max_k)
    if isinstance(k, bool) or not isinstance(k, int):
        raise BadRequest(f"k must be an integer, got {_json_type(k)}")
    if not 1 <= k <= max_k:
        raise BadRequest(f"k must be between 1 and {max_k}, got {k}")
    return RetrievalRequest(
        user_id=user_id,
        recent_item_ids=_id_list(body, "recent_item_ids"),
        k=k,
        exclude_item_ids=_id_list(body, "exclude_item_ids"),
    )


def _id_list(body: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequest(f"{name} must be a list of strings, got {_json_type(value)}")
    if len(value) > MAX_LIST_LENGTH:
        raise BadRequest(f"{name} has {len(value)} entries; at most {MAX_LIST_LENGTH} are allowed")
    for n, item in enumerate(value):
        if not _is_id(item):
            raise BadRequest(
                f"{name}[{n}] must be a non-empty string of at most {MAX_ID_LENGTH} characters, "
                f"got {_json_type(item)}"
            )
    return tuple(value)


def _is_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
