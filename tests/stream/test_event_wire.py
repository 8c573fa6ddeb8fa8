"""The event on the wire: Avro and JSON payloads decode to the same event, and every
malformed payload is refused with a code and a reason (never an unexpected exception)."""

from __future__ import annotations

import itertools

import pytest

from recsys_contracts.event_wire import (
    EVENT_SCHEMA_V1,
    MAGIC,
    SCHEMA_VERSION,
    WireFormat,
    decode_event,
    decode_record,
    encode_event,
    wire_format_from_env,
    wire_format_of,
)
from recsys_contracts.events import Event, EventType, InvalidEvent

TS = 1_767_225_600_000
OPTIONAL = {"dwell_ms": 1500, "request_id": "r-1", "model_version": "v3"}


def events() -> list[Event]:
    """Every type with every combination of the optional fields (dwell needs dwell_ms)."""
    out = []
    for kind in EventType:
        for n in range(len(OPTIONAL) + 1):
            for names in itertools.combinations(OPTIONAL, n):
                if kind is EventType.DWELL and "dwell_ms" not in names:
                    continue
                fields = {name: OPTIONAL[name] for name in names}
                out.append(
                    Event(
                        event_id=f"e-{kind}-{'-'.join(names)}",
                        user_id="u42",
                        item_id="i7",
                        type=kind,
                        ts=TS,
                        **fields,
                    )
                )
    return out


def refusal(payload: bytes | str) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        decode_event(payload)
    return info.value


@pytest.mark.parametrize("wire_format", list(WireFormat))
@pytest.mark.parametrize("event", events(), ids=lambda e: e.event_id)
def test_every_event_round_trips_in_both_formats(event: Event, wire_format: WireFormat) -> None:
    payload = encode_event(event, wire_format)
    assert wire_format_of(payload) is wire_format
    assert decode_event(payload) == event


def test_avro_is_the_default_and_smaller_than_json() -> None:
    event = events()[-1]
    avro, json_ = encode_event(event), encode_event(event, WireFormat.JSON)
    assert avro.startswith(MAGIC + bytes((SCHEMA_VERSION,)))
    assert json_ == event.to_json()
    assert len(avro) < 0.6 * len(json_)


@pytest.mark.parametrize("wire_format", list(WireFormat))
def test_an_impressions_item_list_travels_with_it(wire_format: WireFormat) -> None:
    event = Event(event_id="e1", user_id="u1", item_id="i3", type="impression", ts=TS)
    payload = encode_event(event, wire_format, item_ids=["i3", "i1", "i2"])
    assert decode_record(payload)["item_ids"] == ["i3", "i1", "i2"]
    assert decode_event(payload) == event  # the event model ignores the list
    assert "item_ids" not in decode_record(encode_event(event, wire_format))


def test_json_text_is_still_accepted() -> None:
    event = events()[0]
    assert decode_event(event.to_json().decode()) == event


def unchecked(**fields: object) -> Event:
    """An event the model would refuse (as a foreign producer might write one)."""
    defaults: dict[str, object] = {
        "event_id": "e1", "user_id": "u1", "item_id": "i1", "type": EventType.CLICK, "ts": TS,
        "dwell_ms": None, "request_id": None, "model_version": None,
    }  # fmt: skip
    return Event.model_construct(**{**defaults, **fields})  # type: ignore[arg-type]


def test_avro_values_are_checked_by_the_same_model_as_json_ones() -> None:
    # Avro checks types only; an id with a brace would break the Redis Cluster hash tag.
    problem = refusal(encode_event(unchecked(user_id="u{1}")))
    assert problem.code == "invalid_field"
    assert "user_id: contains characters not allowed here" in problem.reason
    problem = refusal(encode_event(unchecked(type=EventType.DWELL)))
    assert "a dwell event needs dwell_ms" in problem.reason
    assert refusal(encode_event(unchecked(ts=1_767_225_600))).reason.startswith(
        "ts: must be Unix epoch milliseconds"
    )


def test_a_corrupt_avro_payload_is_refused_as_not_avro() -> None:
    payload = encode_event(events()[-1])
    for broken, words in [
        (payload[:-4], "does not decode"),  # truncated
        (payload + b"\x00\x00", "2 bytes after the record"),
        (payload[:3] + b"\xff" * 30, "does not decode"),
        (payload[:3] + b"\x02a\x02u\x02i\x0e", "does not decode"),  # enum index 7 of 5
        (MAGIC, "the header ends before its schema version"),
        (payload[:3], "does not decode"),
    ]:
        problem = refusal(broken)
        assert problem.code == "not_avro", broken
        assert words in problem.reason, (broken, problem.reason)
        assert problem.reason.startswith("Avro event")


def test_an_unknown_schema_version_is_refused_with_the_versions_this_reader_knows() -> None:
    payload = encode_event(events()[-1])
    problem = refusal(MAGIC + bytes((SCHEMA_VERSION + 1,)) + payload[3:])
    assert problem.code == "unknown_schema"
    assert f"schema version {SCHEMA_VERSION + 1} is unknown to this reader" in problem.reason
    assert f"it reads {SCHEMA_VERSION}" in problem.reason


def test_bytes_without_the_header_are_read_as_json() -> None:
    assert refusal(b"\x00\x01binary").code == "not_json"
    assert refusal(b"\xae\x00").code == "not_json"


def test_schema_version_1_names_every_event_type_and_field() -> None:
    # A new type or field must come with a new schema version, not a silent change.
    (type_field,) = (f for f in EVENT_SCHEMA_V1["fields"] if f["name"] == "type")
    assert type_field["type"]["symbols"] == [t.value for t in EventType]
    names = [f["name"] for f in EVENT_SCHEMA_V1["fields"]]
    assert names == [*Event.model_fields, "item_ids"]


def test_the_environment_can_keep_json_and_a_typo_is_named() -> None:
    assert wire_format_from_env({}) is WireFormat.AVRO
    assert wire_format_from_env({"RECSYS_EVENT_WIRE_FORMAT": "JSON"}) is WireFormat.JSON
    with pytest.raises(ValueError, match="RECSYS_EVENT_WIRE_FORMAT='jsn': expected one of"):
        wire_format_from_env({"RECSYS_EVENT_WIRE_FORMAT": "jsn"})
