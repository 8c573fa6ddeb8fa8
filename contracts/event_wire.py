"""Events on the wire: Avro by default, JSON still accepted, told apart by a header.

Every producer encodes with `encode_event` and every consumer decodes with
`decode_event`, so the bytes on the interactions and impressions topics have one
definition, here. An Avro payload is a 3-byte header and the event, written with
the schema of that version and no schema in the message (Avro's "schemaless"
binary encoding, 40-50% of the JSON size)::

    0x00 0xAE <schema version: 1 byte> <Avro binary of the record>

Neither header byte can start a JSON text (or valid UTF-8: 0xAE is a continuation
byte), so a reader tells the formats apart by the first two bytes and producers can
switch one at a time: a topic may hold both. A consumer reads every schema version
it knows, and refuses one it does not (`unknown_schema`) with a reason saying so,
rather than guess: the message goes to the dead-letter topic and can be replayed by
an upgraded consumer. A header with a body that does not decode is `not_avro`.

The record's fields are the event model's (`recsys_contracts.events.Event`) plus
`item_ids`, the whole list an impression showed (JSON producers add it as an extra
field, which the event model ignores). Decoded records are validated by the same
model as JSON ones: Avro checks types, the model checks values.

Changing the schema means a new version: add it to `SCHEMAS` and keep reading the
old ones for as long as topics may hold them (their retention).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import fastavro

from recsys_contracts.env_vars import EventWireEnv
from recsys_contracts.events import (
    Event,
    InvalidEvent,
    event_from_record,
    parse_event,
    parse_json_object,
)

MAGIC = b"\x00\xae"
HEADER_SIZE = len(MAGIC) + 1

# Version 1. Written out in full (not derived from the model) so that a change to the
# model cannot silently change what version 1 means on the wire.
EVENT_SCHEMA_V1: dict[str, Any] = {
    "type": "record",
    "name": "Event",
    "namespace": "recsys.events",
    "doc": "One thing a user did with one item (recsys_contracts.events.Event).",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "user_id", "type": "string"},
        {"name": "item_id", "type": "string"},
        {
            "name": "type",
            "type": {
                "type": "enum",
                "name": "EventType",
                "symbols": ["view", "click", "purchase", "dwell", "impression"],
            },
        },
        {"name": "ts", "type": "long", "doc": "Unix epoch milliseconds."},
        {"name": "dwell_ms", "type": ["null", "long"], "default": None},
        {"name": "request_id", "type": ["null", "string"], "default": None},
        {"name": "model_version", "type": ["null", "string"], "default": None},
        {
            "name": "item_ids",
            "type": ["null", {"type": "array", "items": "string"}],
            "default": None,
            "doc": "Impressions only: every item shown, best first.",
        },
    ],
}

SCHEMAS: dict[int, Any] = {1: fastavro.parse_schema(EVENT_SCHEMA_V1)}
"""Schema version -> parsed schema: every version a consumer can read."""
SCHEMA_VERSION = 1
"""The version producers write."""
_HEADER = MAGIC + bytes((SCHEMA_VERSION,))


class WireFormat(StrEnum):
    AVRO = "avro"
    JSON = "json"


DEFAULT_WIRE_FORMAT = WireFormat.AVRO
WIRE_FORMAT_ENV = EventWireEnv.FORMAT
"""Producers' format when their caller names none: `avro` (default) or `json`, to keep
JSON while some consumer cannot read Avro yet."""


def wire_format_from_env(environ: Mapping[str, str] | None = None) -> WireFormat:
    """The format `RECSYS_EVENT_WIRE_FORMAT` names (default Avro); ValueError if unknown."""
    value = (os.environ if environ is None else environ).get(WIRE_FORMAT_ENV, "").strip()
    if not value:
        return DEFAULT_WIRE_FORMAT
    try:
        return WireFormat(value.lower())
    except ValueError:
        allowed = ", ".join(f.value for f in WireFormat)
        raise ValueError(f"{WIRE_FORMAT_ENV}={value!r}: expected one of {allowed}") from None


def encode_event(
    event: Event,
    wire_format: WireFormat = DEFAULT_WIRE_FORMAT,
    *,
    item_ids: Sequence[str] | None = None,
) -> bytes:
    """The payload of `event` (with an impression's `item_ids`, if given)."""
    if wire_format is WireFormat.JSON:
        if item_ids is None:
            return event.to_json()
        record = event.model_dump(mode="json", exclude_none=True)
        record["item_ids"] = list(item_ids)
        return _json_bytes(record)
    out = io.BytesIO(_HEADER)
    out.seek(HEADER_SIZE)
    record = {
        "event_id": event.event_id,
        "user_id": event.user_id,
        "item_id": event.item_id,
        "type": event.type.value,
        "ts": event.ts,
        "dwell_ms": event.dwell_ms,
        "request_id": event.request_id,
        "model_version": event.model_version,
        "item_ids": None if item_ids is None else list(item_ids),
    }
    fastavro.schemaless_writer(out, SCHEMAS[SCHEMA_VERSION], record)
    return out.getvalue()


def wire_format_of(payload: bytes | str) -> WireFormat:
    """Which format `payload` claims to be in (by its header; it may still be invalid)."""
    if isinstance(payload, bytes) and payload.startswith(MAGIC):
        return WireFormat.AVRO
    return WireFormat.JSON


def decode_event(payload: bytes | str) -> Event:
    """The event in `payload`, Avro or JSON, or InvalidEvent saying what is wrong.

    A drop-in for `parse_event` (same argument, result and errors), which accepts Avro too.
    """
    if isinstance(payload, bytes) and payload.startswith(MAGIC):
        return event_from_record(_avro_record(payload))
    return parse_event(payload)


def decode_record(payload: bytes | str) -> dict[str, Any]:
    """The fields of `payload` as written, extras (`item_ids`) included, after checking
    that they make a valid event; InvalidEvent otherwise."""
    if isinstance(payload, bytes) and payload.startswith(MAGIC):
        record = _avro_record(payload)
    else:
        record = parse_json_object(payload if isinstance(payload, str) else _utf8(payload))
    event_from_record(record)
    return {k: v for k, v in record.items() if v is not None}


def _avro_record(payload: bytes) -> dict[str, Any]:
    if len(payload) < HEADER_SIZE:
        raise InvalidEvent("not_avro", "Avro event: the header ends before its schema version")
    version = payload[len(MAGIC)]
    schema = SCHEMAS.get(version)
    if schema is None:
        known = ", ".join(str(v) for v in sorted(SCHEMAS))
        raise InvalidEvent(
            "unknown_schema",
            f"Avro event schema version {version} is unknown to this reader (it reads {known}); "
            "a newer producer wrote it: upgrade the consumer and replay the dead letters",
        )
    body = io.BytesIO(payload)
    body.seek(HEADER_SIZE)
    try:
        record = fastavro.schemaless_reader(body, schema, None)
    except Exception as exc:  # fastavro raises EOFError, ValueError, IndexError, ... on junk
        raise InvalidEvent(
            "not_avro", f"Avro event (schema v{version}) does not decode: {_describe(exc)}"
        ) from None
    left = len(payload) - body.tell()
    if left:
        raise InvalidEvent(
            "not_avro", f"Avro event (schema v{version}): {left} bytes after the record"
        )
    if not isinstance(record, dict):  # pragma: no cover - the schema is a record
        raise InvalidEvent("not_avro", f"Avro event (schema v{version}) is not a record")
    return record


def _describe(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _utf8(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent("not_json", f"not JSON: not UTF-8 at byte {exc.start}") from None


def _json_bytes(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
