"""The event on the wire: Avro and JSON payloads decode to the same event, and every
malformed payload is refused with a code and a reason (never an unexpected exception)."""

from __future__ import annotations

import io
import itertools
from typing import Any
from unittest.mock import patch

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from recsys_contracts import event_wire
from recsys_contracts.event_wire import (
    BATCH_SCHEMA_VERSION,
    EVENT_SCHEMA_V1,
    HEADER_SIZE,
    MAGIC,
    SCHEMA_VERSION,
    SCHEMAS,
    WireFormat,
    _read_v1_payload,
    decode_event,
    decode_events,
    decode_record,
    decode_records,
    encode_batch,
    encode_event,
    encode_impression,
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
    newer = max(SCHEMAS) + 1
    problem = refusal(MAGIC + bytes((newer,)) + payload[3:])
    assert problem.code == "unknown_schema"
    assert f"schema version {newer} is unknown to this reader" in problem.reason
    assert "it reads 1, 2" in problem.reason


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


# --- the hand-written version-1 writer, impressions and batches ------------------------


@pytest.mark.parametrize("event", events(), ids=lambda e: e.event_id)
@pytest.mark.parametrize(
    "item_ids",
    [None, [], ["i7"], ["i7", "ü" * 40, "x" * 256], [f"i{n}" for n in range(200)]],
    ids=["none", "empty", "one", "long-and-unicode", "200"],
)
def test_the_writer_writes_the_bytes_fastavro_writes(
    event: Event, item_ids: list[str] | None
) -> None:
    """Readers use fastavro: the hand-written encoder must be its exact equal."""
    record = event.model_dump(mode="json") | {"item_ids": item_ids}
    out = io.BytesIO()
    fastavro.schemaless_writer(out, SCHEMAS[SCHEMA_VERSION], record)
    assert encode_event(event, item_ids=item_ids)[HEADER_SIZE:] == out.getvalue()


def impression(**overrides: object) -> bytes:
    fields: dict[str, Any] = {
        "event_id": "e1",
        "user_id": "u1",
        "item_ids": ["i3", "i1"],
        "ts": TS,
        "request_id": "r1",
        "model_version": "v2",
    }
    return encode_impression(**(fields | overrides))


def test_an_impression_encoded_without_the_model_is_the_models_event() -> None:
    event, record = decode_records(impression())[0]
    assert event == Event(
        event_id="e1",
        user_id="u1",
        item_id="i3",
        type=EventType.IMPRESSION,
        ts=TS,
        request_id="r1",
        model_version="v2",
    )
    assert record["item_ids"] == ["i3", "i1"]
    assert impression() == encode_event(event, item_ids=["i3", "i1"])


@pytest.mark.parametrize(
    "overrides",
    [
        {"item_ids": ["i3", "has space"]},
        {"item_ids": ["i3", "trailing\n"]},
        {"item_ids": ["i3", ""]},
        {"item_ids": []},
        {"item_ids": ["i3", "x" * 257]},
        {"user_id": "{brace}"},
        {"event_id": "zero\u200bwidth"},
        {"model_version": "-v2"},
        {"request_id": "r" * 257},
        {"ts": 1_767_225_600},  # seconds, not milliseconds
    ],
    ids=repr,
)
def test_an_impression_the_contract_refuses_is_refused_before_it_is_sent(
    overrides: dict[str, object],
) -> None:
    fields: dict[str, Any] = {
        "event_id": "e1",
        "user_id": "u1",
        "ts": TS,
        "request_id": "r1",
        "model_version": "v2",
        "item_ids": ["i3"],
    } | overrides
    items = fields.pop("item_ids")
    # The model refuses the same event (one event per item shown, as the join writes them).
    with pytest.raises(ValidationError):
        for item in items or [""]:
            Event(type=EventType.IMPRESSION, item_id=item, **fields)
    with pytest.raises(InvalidEvent) as info:
        impression(**overrides)
    assert info.value.code == "invalid_field"


def test_a_batch_holds_events_in_order_and_single_payloads_read_alike() -> None:
    singles = [encode_event(e) for e in events()[:5]] + [impression()]
    batch = encode_batch(singles)
    assert batch.startswith(MAGIC + bytes((BATCH_SCHEMA_VERSION,)))
    expected = [decode_event(p) for p in singles]
    assert decode_events(batch) == expected
    assert [event for event, _ in decode_records(batch)] == expected
    assert decode_records(batch)[-1][1]["item_ids"] == ["i3", "i1"]
    # The same bytes fastavro writes for schema 2.
    out = io.BytesIO()
    records = [decode_records(p)[0][1] for p in singles]
    fastavro.schemaless_writer(out, SCHEMAS[BATCH_SCHEMA_VERSION], {"events": records})
    assert batch[HEADER_SIZE:] == out.getvalue()
    # A single payload, Avro or JSON, is a list of one.
    for payload in (singles[0], encode_event(expected[0], WireFormat.JSON)):
        assert decode_events(payload) == [expected[0]]


def test_a_reader_of_one_event_refuses_a_batch_and_says_how_to_read_it() -> None:
    batch = encode_batch([impression(), impression(event_id="e2")])
    for read in (decode_event, decode_record):
        with pytest.raises(InvalidEvent) as info:
            read(batch)
        assert info.value.code == "unknown_schema"
        assert "a batch of 2 events" in info.value.reason and "decode_events" in info.value.reason


def test_a_batch_with_one_invalid_event_is_invalid_as_a_whole() -> None:
    bad = encode_event(
        unchecked(event_id="e9", user_id="u 9", item_id="i", type=EventType.VIEW, ts=TS)
    )
    with pytest.raises(InvalidEvent) as info:
        decode_events(encode_batch([impression(), bad]))
    assert info.value.code == "invalid_field"
    with pytest.raises(InvalidEvent) as info:
        decode_events(encode_batch([impression(), impression()])[:-3])  # cut short
    assert info.value.code == "not_avro"


def test_only_avro_events_can_be_batched() -> None:
    with pytest.raises(ValueError, match="only Avro version-1"):
        encode_batch([impression(), encode_event(events()[0], WireFormat.JSON)])
    with pytest.raises(ValueError, match="at least one"):
        encode_batch([])


# --- the hand-written version-1 reader ---------------------------------------------

texts = st.text(max_size=90)  # past 63 bytes, a string's length takes two bytes


def records(longs: st.SearchStrategy[int]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "event_id": texts,
            "user_id": texts,
            "item_id": texts,
            "type": st.sampled_from([t.value for t in EventType]),
            "ts": longs,
            "dwell_ms": st.none() | longs,
            "request_id": st.none() | texts,
            "model_version": st.none() | texts,
            "item_ids": st.none() | st.lists(texts, max_size=70),
        }
    )


# The reader reads longs of up to 9 bytes (fastavro the 10th, whatever it holds).
READ_LONGS = st.integers(-(2**62), 2**62 - 1)
INT64S = st.integers(-(2**63), 2**63 - 1)


def outcome_of(payload: bytes) -> tuple[str, Any]:
    """What `decode_record` makes of `payload`: its record or its refusal."""
    try:
        return "record", decode_record(payload)
    except InvalidEvent as problem:
        return problem.code, problem.reason


@settings(max_examples=300, deadline=None)
@given(records(READ_LONGS))
def test_the_reader_reads_the_record_fastavro_reads(record: dict[str, Any]) -> None:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, SCHEMAS[SCHEMA_VERSION], record)
    payload = MAGIC + bytes((SCHEMA_VERSION,)) + out.getvalue()
    body = io.BytesIO(payload[HEADER_SIZE:])
    assert _read_v1_payload(payload) == fastavro.schemaless_reader(body, SCHEMAS[1], None)


@settings(max_examples=300, deadline=None)
@given(records(INT64S), st.binary(max_size=12), st.integers(0, 200))
def test_a_payload_reads_as_through_fastavro_alone_whatever_its_bytes(
    record: dict[str, Any], junk: bytes, cut: int
) -> None:
    # Valid payloads, truncated ones and ones with junk spliced in: the same record or the
    # same refusal (code and reason) as when fastavro reads every payload.
    out = io.BytesIO()
    fastavro.schemaless_writer(out, SCHEMAS[SCHEMA_VERSION], record)
    body = out.getvalue()
    for payload in (body, body[:cut], body[:cut] + junk + body[cut:], body[:cut] + junk):
        payload = MAGIC + bytes((SCHEMA_VERSION,)) + payload
        with patch.object(event_wire, "_read_v1_payload", return_value=None):
            expected = outcome_of(payload)
        assert outcome_of(payload) == expected
