"""The event schema: what is accepted, and the reasons given for what is not."""

from __future__ import annotations

import json

import pytest

from recsys_contracts.events import (
    Event,
    EventType,
    InvalidEvent,
    check_event_time,
    event_from_record,
    fill_missing,
    new_event,
    parse_event,
    parse_json_object,
)

GOOD = {
    "event_id": "e1",
    "user_id": "u42",
    "item_id": "i7",
    "type": "click",
    "ts": 1_767_225_600_000,
    "request_id": "r-1",
    "model_version": "v3",
}


def payload(**changes: object) -> bytes:
    record = {**GOOD, **changes}
    return json.dumps({k: v for k, v in record.items() if v is not ...}).encode()


def reason_of(data: bytes | str) -> tuple[str, str]:
    with pytest.raises(InvalidEvent) as info:
        parse_event(data)
    return info.value.code, info.value.reason


def test_a_valid_event_round_trips_through_its_wire_form() -> None:
    event = parse_event(payload())
    assert event.type is EventType.CLICK
    assert event.dwell_ms is None
    assert parse_event(event.to_json()) == event
    assert b"dwell_ms" not in event.to_json()  # unset optional fields are omitted


def test_unknown_fields_are_ignored_so_producers_can_add_fields_first() -> None:
    event = parse_event(payload(item_ids=["i7", "i8"], campaign="x"))
    assert event.item_id == "i7"


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (b"{not json", "not_json", "Invalid JSON"),
        (b"\xff\xfe", "not_json", "Invalid JSON"),
        (b"[1, 2]", "not_an_object", "object"),
        (payload(type="like"), "invalid_field", "type: Input should be 'view'"),
        (payload(ts=1_767_225_600), "invalid_field", "ts: must be Unix epoch milliseconds"),
        (payload(ts="1767225600000"), "invalid_field", "ts: Input should be a valid integer"),
        (payload(ts=1.5e12), "invalid_field", "ts: Input should be a valid integer"),
        (payload(user_id="a{b}"), "invalid_field", "user_id: contains characters not allowed"),
        (payload(item_id="has space"), "invalid_field", "item_id: contains characters"),
        (payload(event_id=""), "invalid_field", "event_id"),
        (payload(model_version="v 1"), "invalid_field", "model_version: must match"),
        (
            payload(dwell_ms=-1),
            "invalid_field",
            "dwell_ms: Input should be greater than or equal to 0",
        ),
        (payload(type="dwell"), "invalid_field", "a dwell event needs dwell_ms"),
        (payload(user_id=...), "invalid_field", "user_id: Field required"),
    ],
)
def test_invalid_events_are_refused_with_a_reason_naming_the_field(
    data: bytes, code: str, words: str
) -> None:
    got_code, reason = reason_of(data)
    assert got_code == code
    assert words in reason


def test_every_problem_of_an_event_is_reported_at_once() -> None:
    _, reason = reason_of(payload(type="like", ts=5, user_id=...))
    assert reason.count(";") == 2
    assert "type:" in reason and "ts:" in reason and "user_id:" in reason


def test_a_dwell_event_with_its_duration_is_valid() -> None:
    assert parse_event(payload(type="dwell", dwell_ms=1500)).dwell_ms == 1500


def test_an_event_from_the_future_is_refused_and_one_within_the_allowance_is_not() -> None:
    event = parse_event(payload())
    check_event_time(event, now_ms=event.ts - 60_000, max_future_ms=300_000)
    with pytest.raises(InvalidEvent) as info:
        check_event_time(event, now_ms=event.ts - 3_600_000, max_future_ms=300_000)
    assert info.value.code == "future_ts"
    assert "3600s in the future" in info.value.reason


def test_new_event_fills_id_and_time_and_validates() -> None:
    a = new_event("u1", "i1", "view")
    b = new_event("u1", "i1", "view", ts=1_767_225_600_000)
    assert a.event_id != b.event_id and len(a.event_id) == 32
    assert b.ts == 1_767_225_600_000
    with pytest.raises(ValueError):
        new_event("u1", "i1", "like")


def test_fill_missing_keeps_given_values_and_adds_only_absent_ones() -> None:
    given = fill_missing({"event_id": "mine", "ts": 1}, at_ms=99)
    assert given == {"event_id": "mine", "ts": 1}
    filled = fill_missing({"user_id": "u"}, at_ms=1_767_225_600_000)
    assert filled["ts"] == 1_767_225_600_000 and len(filled["event_id"]) == 32


def test_records_and_lines_give_the_same_reasons_as_payloads() -> None:
    with pytest.raises(InvalidEvent, match="type: Input should be"):
        event_from_record({**GOOD, "type": "like"})
    with pytest.raises(InvalidEvent, match="expected a JSON object, got list"):
        parse_json_object("[1]")
    with pytest.raises(InvalidEvent, match="not JSON"):
        parse_json_object("{")
    assert isinstance(event_from_record(GOOD), Event)
