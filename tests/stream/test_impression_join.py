"""The impression join on its own: when impressions fall due, and which clicks count."""

from __future__ import annotations

import json

from recsys_contracts.event_wire import decode_records
from recsys_contracts.events import Event, EventType
from stream_jobs.impression_join import ImpressionJoin, PendingImpression, listed_items

T = 1_767_225_600_000
WINDOW = 60_000


def impression(n: int, ts: int, received_at: float = 0.0) -> PendingImpression:
    event = Event(
        event_id=f"imp-{n}", user_id="u", item_id="a", type=EventType.IMPRESSION, ts=ts,
        request_id=f"r-{n}",
    )  # fmt: skip
    return PendingImpression(event, ["a", "b"], message=n, received_at=received_at)


def click(n: int, item: str, ts: int) -> Event:
    return Event(
        event_id=f"c-{n}-{item}-{ts}", user_id="u", item_id=item, type=EventType.CLICK, ts=ts,
        request_id=f"r-{n}",
    )  # fmt: skip


def test_an_impression_is_due_once_the_event_time_passes_its_window() -> None:
    join = ImpressionJoin(WINDOW)
    join.add_impression(impression(1, T))
    join.observe(T + WINDOW - 1)
    assert join.due(now=0.0) == []
    join.observe(T + WINDOW)
    assert [p.message for p in join.due(now=0.0)] == [1]
    assert join.pending == 0


def test_when_traffic_stops_the_wall_clock_decides() -> None:
    join = ImpressionJoin(WINDOW)
    join.add_impression(impression(1, T, received_at=100.0))
    join.add_impression(impression(2, T + 1, received_at=130.0))
    join.observe(T + 1)
    assert [p.message for p in join.due(now=159.0)] == []
    assert [p.message for p in join.due(now=160.0)] == [1]
    assert [p.message for p in join.due(now=190.0)] == [2]


def test_past_the_cap_the_oldest_are_written_with_the_clicks_seen_so_far() -> None:
    join = ImpressionJoin(WINDOW)
    for n in (3, 1, 4, 2, 5):
        join.add_impression(impression(n, T + n))
    join.add_click(click(1, "b", T + 10))
    due = join.due(now=0.0, max_pending=3)
    assert [p.message for p in due] == [1, 2]
    assert [r["clicked"] for r in join.rows(due[0])] == [False, True]
    assert join.pending == 3


def test_only_clicks_on_the_shown_item_within_the_window_count() -> None:
    join = ImpressionJoin(WINDOW)
    pending = impression(1, T)
    join.add_click(click(1, "a", T + WINDOW + 1))  # too late
    join.add_click(click(1, "b", T + 5))
    join.add_click(click(1, "b", T + 2))  # the first click is click_ts
    join.add_click(click(1, "z", T + 3))  # not shown
    rows = join.rows(pending)
    assert [(r["item_id"], r["clicked"], r["click_ts"], r["position"]) for r in rows] == [
        ("a", False, None, 0),
        ("b", True, T + 2, 1),
    ]


def test_the_shown_items_come_from_the_gateway_list_or_the_event() -> None:
    event = impression(1, T).event
    record = {**event.model_dump(mode="json"), "item_ids": ["a", "b", "a", "c"]}
    for payload, shown in (
        (json.dumps(record).encode(), ["a", "b", "c"]),
        (event.to_json(), ["a"]),
    ):
        ((decoded, fields),) = decode_records(payload)
        assert listed_items(decoded, fields) == shown
