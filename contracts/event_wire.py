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

A message may also hold a batch of events (schema version 2: a record with one field,
`events`, an array of version-1 events)::

    0x00 0xAE 0x02 <Avro array of version-1 event records>

The gateway sends its impressions so, many to a message: one Pulsar send (and one
acknowledgement callback) per batch instead of per event is what keeps the hand-over
cheap. Consumers read every payload with `decode_events`, which returns the one event
of a single-event payload (Avro v1 or JSON) and every event of a batch;
`decode_event`, which returns exactly one, refuses a batch (`unknown_schema`, saying
so), as a consumer that predates batches would. A batch is valid only as a whole: one
event the model refuses makes the whole message invalid (a consumer dead-letters it),
so producers check each event before batching (`encode_impression` does).

Changing the schema means a new version: add it to `SCHEMAS` and keep reading the
old ones for as long as topics may hold them (their retention).

`encode_event` and `encode_impression` write version 1 with a hand-written encoder
for this one schema (a tenth of `fastavro.schemaless_writer`'s cost per event; the
tests check the bytes are the same); readers read version 1 with its hand-written
mirror and leave anything else (other versions, a payload it cannot read) to fastavro.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import fastavro

from recsys_contracts.env_vars import EventWireEnv
from recsys_contracts.events import (
    ID_PATTERN,
    MIN_TS_MS,
    USER_ID_PATTERN,
    Event,
    EventType,
    InvalidEvent,
    event_from_record,
    parse_event,
    parse_json_object,
)
from recsys_contracts.model_version import MODEL_VERSION_PATTERN

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

# Version 2: several version-1 events in one message.
EVENT_BATCH_SCHEMA_V2: dict[str, Any] = {
    "type": "record",
    "name": "EventBatch",
    "namespace": "recsys.events",
    "doc": "Several events in one message, in the order they were produced.",
    "fields": [{"name": "events", "type": {"type": "array", "items": EVENT_SCHEMA_V1}}],
}

SCHEMAS: dict[int, Any] = {
    1: fastavro.parse_schema(EVENT_SCHEMA_V1),
    2: fastavro.parse_schema(EVENT_BATCH_SCHEMA_V2),
}
"""Schema version -> parsed schema: every version a consumer can read."""
SCHEMA_VERSION = 1
"""The version producers write for one event."""
BATCH_SCHEMA_VERSION = 2
"""The version of a batch of events."""
_HEADER = MAGIC + bytes((SCHEMA_VERSION,))
_BATCH_HEADER = MAGIC + bytes((BATCH_SCHEMA_VERSION,))
_EVENT_TYPES = tuple(EVENT_SCHEMA_V1["fields"][3]["type"]["symbols"])
_TYPE_INDEX = {symbol: index for index, symbol in enumerate(_EVENT_TYPES)}
_ID = re.compile(ID_PATTERN)
# Several ids, one to a line (a newline is never in an id): one match for a whole list.
_ID_LINES = re.compile(rf"{ID_PATTERN[1:-1]}(?:\n{ID_PATTERN[1:-1]})*")
_USER_ID = re.compile(USER_ID_PATTERN)
_MODEL_VERSION = re.compile(MODEL_VERSION_PATTERN)


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
    return _HEADER + _avro_v1(
        event.event_id,
        event.user_id,
        event.item_id,
        event.type.value,
        event.ts,
        event.dwell_ms,
        event.request_id,
        event.model_version,
        item_ids,
    )


def encode_impression(
    *,
    event_id: str,
    user_id: str,
    item_ids: Sequence[str],
    ts: int,
    request_id: str,
    model_version: str,
) -> bytes:
    """An impression's Avro payload (`item_id` the first of `item_ids`), checked against
    the event contract without building the model: InvalidEvent for a field it refuses.

    The gateway's hot path (one per recommendation): the same checks as `Event`'s for
    these fields (the id patterns, the model version's, the time's lower bound), at a
    fraction of the cost."""
    if not item_ids:
        raise InvalidEvent("invalid_field", "item_ids: an impression shows at least one item")
    for field, value, pattern in (
        ("event_id", event_id, _ID),
        ("user_id", user_id, _USER_ID),
        ("model_version", model_version, _MODEL_VERSION),
    ):
        if pattern.fullmatch(value) is None:
            raise InvalidEvent("invalid_field", f"{field}: {value!r} is not a valid {field}")
    if _ID_LINES.fullmatch("\n".join(item_ids)) is None:
        bad = next(i for i in item_ids if _ID.fullmatch(i) is None)
        raise InvalidEvent("invalid_field", f"item_id: {bad!r} is not a valid item id")
    if len(request_id) > 256:
        raise InvalidEvent("invalid_field", "request_id: longer than 256 characters")
    if type(ts) is not int or not MIN_TS_MS <= ts <= 10**14:
        raise InvalidEvent("invalid_field", f"ts: {ts!r} is not epoch milliseconds")
    return _HEADER + _avro_v1(
        event_id,
        user_id,
        item_ids[0],
        EventType.IMPRESSION.value,
        ts,
        None,
        request_id,
        model_version,
        item_ids,
    )


def encode_batch(payloads: Sequence[bytes]) -> bytes:
    """One message holding the events of `payloads` (each from `encode_event` or
    `encode_impression`, Avro), in order: schema version 2. ValueError for a payload
    that is not an Avro version-1 event (JSON cannot be batched)."""
    if not payloads:
        raise ValueError("a batch holds at least one event")
    for payload in payloads:
        if not payload.startswith(_HEADER):
            raise ValueError("only Avro version-1 event payloads can be batched")
    # Avro's array: one block (its item count), the items, then an empty block.
    return b"".join(
        (_BATCH_HEADER, _long(len(payloads)), *(p[HEADER_SIZE:] for p in payloads), b"\x00")
    )


# --- the version-1 writer -------------------------------------------------------
# Avro's binary encoding (https://avro.apache.org/docs/1.11.1/specification/): a long
# is zig-zag then base-128 varint, little end first; a string its UTF-8 length and the
# bytes; an enum its symbol's index; a union its branch's index, then the value (none
# for null); an array blocks of (count, items), then a count of 0.


def _long(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes((n,)) for n in range(0x80)]


def _string(text: str) -> bytes:
    data = text.encode()
    return _long(len(data)) + data


def _optional_string(text: str | None) -> bytes:
    return b"\x00" if text is None else b"\x02" + _string(text)


def _avro_v1(
    event_id: str,
    user_id: str,
    item_id: str,
    event_type: str,
    ts: int,
    dwell_ms: int | None,
    request_id: str | None,
    model_version: str | None,
    item_ids: Sequence[str] | None,
) -> bytes:
    parts = [
        _string(event_id),
        _string(user_id),
        _string(item_id),
        _SMALL[2 * _TYPE_INDEX[event_type]],
        _long(ts),
        b"\x00" if dwell_ms is None else b"\x02" + _long(dwell_ms),
        _optional_string(request_id),
        _optional_string(model_version),
    ]
    if item_ids is None:
        parts.append(b"\x00")
    else:
        parts.append(b"\x02")
        if item_ids:
            parts.append(_long(len(item_ids)))
            for text in item_ids:
                data = text.encode()
                parts.append(_SMALL[2 * len(data)] if len(data) < 0x40 else _long(len(data)))
                parts.append(data)
        parts.append(b"\x00")
    return b"".join(parts)


def wire_format_of(payload: bytes | str) -> WireFormat:
    """Which format `payload` claims to be in (by its header; it may still be invalid)."""
    if isinstance(payload, bytes) and payload.startswith(MAGIC):
        return WireFormat.AVRO
    return WireFormat.JSON


def decode_event(payload: bytes | str) -> Event:
    """The event in `payload`, Avro or JSON, or InvalidEvent saying what is wrong.

    A drop-in for `parse_event` (same argument, result and errors), which accepts Avro too.
    A batch (several events) is refused: read those with `decode_events`.
    """
    if isinstance(payload, bytes) and payload.startswith(MAGIC):
        # _avro_record tries the fast version-1 reader first, then fastavro
        return event_from_record(_single(_avro_record(payload)))
    return parse_event(payload)


def decode_events(payload: bytes | str) -> list[Event]:
    """Every event in `payload`: the one of a single-event payload (Avro or JSON), or
    those of a batch, in order; InvalidEvent if any of them is not a valid event (a
    batch is valid as a whole or not at all)."""
    return [event_from_record(record) for record in _records(payload)]


def decode_record(payload: bytes | str) -> dict[str, Any]:
    """The fields of `payload` as written, extras (`item_ids`) included, after checking
    that they make a valid event; InvalidEvent otherwise (also for a batch)."""
    if isinstance(payload, bytes) and payload.startswith(MAGIC):
        record = _single(_avro_record(payload))
    else:
        record = parse_json_object(payload if isinstance(payload, str) else _utf8(payload))
    event_from_record(record)
    return {k: v for k, v in record.items() if v is not None}


def decode_records(payload: bytes | str) -> list[tuple[Event, dict[str, Any]]]:
    """Each event in `payload` with its fields as written (extras such as `item_ids`
    included, nulls left out), in order; InvalidEvent as `decode_events`."""
    return [
        (event_from_record(record), {k: v for k, v in record.items() if v is not None})
        for record in _records(payload)
    ]


def _records(payload: bytes | str) -> list[dict[str, Any]]:
    if isinstance(payload, bytes) and payload.startswith(MAGIC):
        record = _avro_record(payload)
        if payload[len(MAGIC)] == BATCH_SCHEMA_VERSION:
            events = record.get("events")
            if not isinstance(events, list) or not events:
                raise InvalidEvent("not_avro", "Avro event batch (schema v2) holds no events")
            return events
        return [record]
    return [parse_json_object(payload if isinstance(payload, str) else _utf8(payload))]


def _single(record: dict[str, Any]) -> dict[str, Any]:
    if "events" in record and "event_id" not in record:
        raise InvalidEvent(
            "unknown_schema",
            f"a batch of {len(record['events'])} events (schema v{BATCH_SCHEMA_VERSION}) where "
            "one event was expected: this consumer reads batches with decode_events",
        )
    return record


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
    if version == SCHEMA_VERSION:
        fast = _read_v1_payload(payload)
        if fast is not None:
            return fast
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


# --- the version-1 reader ------------------------------------------------------
# The mirror of the writer above, for the consumers' hot path (3.3 us an event against
# fastavro.schemaless_reader's 5.5 on a dev-2c core). It reads what a valid version-1
# payload holds, in the dict fastavro makes of it (the tests check both agree); on
# anything else (a truncated or malformed body, bytes left over, a varint beyond 63
# bits, an array in blocks with byte sizes, text that is not UTF-8) it gives up and
# fastavro reads the payload, so a bad payload is refused with fastavro's own reason.


class _Unreadable(Exception):
    """The payload is not a plain version-1 record: leave it to fastavro."""


def _read_v1_payload(payload: bytes) -> dict[str, Any] | None:
    """The record of a version-1 payload, or None when fastavro has to read it."""
    try:
        record, end = _read_v1(payload, HEADER_SIZE)
    except (_Unreadable, IndexError, UnicodeDecodeError):
        return None
    return record if end == len(payload) else None


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """The zig-zag varint long at `pos`, and the position after it."""
    byte = data[pos]
    if byte < 0x80:
        return (byte >> 1) ^ -(byte & 1), pos + 1
    n, shift = byte & 0x7F, 7
    while True:
        pos += 1
        byte = data[pos]
        n |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (n >> 1) ^ -(n & 1), pos + 1
        shift += 7
        if shift > 56:
            raise _Unreadable  # beyond 63 bits: fastavro decides what it means


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    size, pos = _read_long(data, pos)
    end = pos + size
    if size < 0 or end > len(data):
        raise _Unreadable
    return data[pos:end].decode(), end


def _read_optional_string(data: bytes, pos: int) -> tuple[str | None, int]:
    branch = data[pos]
    if branch == 0:
        return None, pos + 1
    if branch != 2:
        raise _Unreadable
    return _read_string(data, pos + 1)


def _read_v1(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
    # The strings are inlined for the common short ones (a one-byte length): a call
    # per field cost more than the reading.
    texts = []
    for _ in range(3):  # event_id, user_id, item_id
        size = data[pos]
        if size < 0x80 and not size & 1:
            start, pos = pos + 1, pos + 1 + (size >> 1)
            if pos > len(data):
                raise _Unreadable
            texts.append(data[start:pos].decode())
        else:
            text, pos = _read_string(data, pos)
            texts.append(text)
    symbol = data[pos]
    if symbol & 1 or symbol >> 1 >= len(_EVENT_TYPES):
        raise _Unreadable
    ts, pos = _read_long(data, pos + 1)
    dwell_ms: int | None = None
    branch = data[pos]
    if branch == 2:
        dwell_ms, pos = _read_long(data, pos + 1)
    elif branch == 0:
        pos += 1
    else:
        raise _Unreadable
    request_id: str | None = None
    if data[pos] == 0:
        pos += 1
    else:
        request_id, pos = _read_optional_string(data, pos)
    model_version: str | None = None
    if data[pos] == 0:
        pos += 1
    else:
        model_version, pos = _read_optional_string(data, pos)
    item_ids: list[str] | None = None
    branch = data[pos]
    pos += 1
    if branch == 2:
        item_ids = []
        while True:
            count, pos = _read_long(data, pos)
            if count == 0:
                break
            if count < 0:
                raise _Unreadable  # a block with its byte size
            for _ in range(count):
                text, pos = _read_string(data, pos)
                item_ids.append(text)
    elif branch != 0:
        raise _Unreadable
    record = {
        "event_id": texts[0],
        "user_id": texts[1],
        "item_id": texts[2],
        "type": _EVENT_TYPES[symbol >> 1],
        "ts": ts,
        "dwell_ms": dwell_ms,
        "request_id": request_id,
        "model_version": model_version,
        "item_ids": item_ids,
    }
    return record, pos


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
