"""How the event sink packs what it took from its buffer into Pulsar messages:
impressions batched (per system and topic, bounded in count and bytes, in order, one
alone stays a single keyed event), everything else one event to a message."""

from __future__ import annotations

from gateway.event_sink import MAX_BATCH_BYTES, MAX_BATCH_EVENTS, OutgoingEvent, OutgoingMessage
from recsys_contracts.event_wire import WireFormat, decode_events, encode_event, encode_impression
from recsys_contracts.events import Event, EventType

TS = 1_767_225_600_000


def impression(n: int, topic: str = "imp", items: int = 2, item_chars: int = 4) -> OutgoingEvent:
    payload = encode_impression(
        event_id=f"e{n}",
        user_id=f"u{n}",
        item_ids=[f"{'i' * item_chars}{k}" for k in range(items)],
        ts=TS,
        request_id=f"r{n}",
        model_version="1",
    )
    return OutgoingEvent("sys", "impressions", "pulsar://b", topic, f"u{n}", payload)


def click(n: int) -> OutgoingEvent:
    event = Event(event_id=f"c{n}", user_id=f"u{n}", item_id="i", type=EventType.CLICK, ts=TS)
    return OutgoingEvent("sys", "interactions", "pulsar://b", "int", f"u{n}", encode_event(event))


def event_ids(message: OutgoingMessage) -> list[str]:
    return [e.event_id for e in decode_events(message.payload)]


def test_impressions_go_in_batches_and_interactions_alone_keyed_by_user() -> None:
    taken = [impression(0), click(0), impression(1), impression(2, topic="other"), click(1)]
    messages = OutgoingMessage.messages(taken)
    singles = [m for m in messages if m.key is not None]
    assert [(m.key, event_ids(m)) for m in singles] == [
        ("u0", ["c0"]),
        ("u1", ["c1"]),
        ("u2", ["e2"]),  # alone on its topic: a single event, keyed
    ]
    (batch,) = [m for m in messages if m.key is None]
    assert event_ids(batch) == ["e0", "e1"]
    assert batch.events == [taken[0], taken[2]]  # their outcome is the batch's


def test_a_batch_is_bounded_in_events_and_bytes_and_keeps_the_order() -> None:
    many = [impression(n) for n in range(2 * MAX_BATCH_EVENTS + 3)]
    messages = OutgoingMessage.messages(many)
    assert [len(m.events) for m in messages] == [MAX_BATCH_EVENTS, MAX_BATCH_EVENTS, 3]
    assert [i for m in messages for i in event_ids(m)] == [f"e{n}" for n in range(len(many))]

    large = [impression(n, items=40, item_chars=250) for n in range(120)]  # ~10 KB each
    messages = OutgoingMessage.messages(large)
    assert len(messages) > 1
    assert all(len(m.payload) <= MAX_BATCH_BYTES + 64 for m in messages)
    assert [i for m in messages for i in event_ids(m)] == [f"e{n}" for n in range(120)]


def test_json_impressions_are_not_batched() -> None:
    event = Event(event_id="j1", user_id="u1", item_id="i", type=EventType.IMPRESSION, ts=TS)
    as_json = OutgoingEvent(
        "sys", "impressions", "pulsar://b", "imp", "u1", encode_event(event, WireFormat.JSON)
    )
    messages = OutgoingMessage.messages([as_json, impression(1), impression(2)])
    assert [(m.key, len(m.events)) for m in messages] == [("u1", 1), (None, 2)]
