"""Impressions joined with their clicks by `request_id`, in a bounded window of event time.

An impression (the gateway's: `item_id` the top item, `item_ids` the whole list) waits
until the sink has seen events `window` later in event time than it (the watermark,
the newest `ts` seen), or until it has waited `window` of wall-clock time when traffic
stops; then it becomes one row per item shown, `clicked` when a click with its
`request_id` named that item at most `window` after it (`click_ts`: the first such click). A click that comes
later than that is still logged as an interaction, just not joined.

Pure logic: the sink feeds it events and writes what falls due.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from recsys_contracts.events import Event, EventType


@dataclass
class PendingImpression:
    event: Event
    item_ids: list[str]
    message: Any  # acknowledged once its rows are written (a SharedMessage: once all its events')
    received_at: float = field(default_factory=time.monotonic)


def listed_items(event: Event, record: dict[str, Any]) -> list[str]:
    """The items an impression showed, best first: the gateway's `item_ids` when the
    record (as `event_wire.decode_records` gives it) has them (the event model ignores
    that field), else just `item_id`."""
    listed = record.get("item_ids")
    if isinstance(listed, list) and listed and all(isinstance(i, str) for i in listed):
        return list(dict.fromkeys(listed))  # a repeated item is one impression
    return [event.item_id]


class ImpressionJoin:
    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self.watermark_ms = 0
        self._clicks: dict[str, dict[str, int]] = {}  # request_id -> item -> first click ts
        self._click_order: list[tuple[int, str]] = []  # heap of (ts, request_id) for eviction
        self._pending: list[tuple[int, int, PendingImpression]] = []  # heap by ts
        self._sequence = itertools.count()

    def observe(self, ts_ms: int) -> None:
        self.watermark_ms = max(self.watermark_ms, ts_ms)

    def add_click(self, event: Event) -> None:
        if event.type is not EventType.CLICK or not event.request_id:
            return
        items = self._clicks.setdefault(event.request_id, {})
        if event.item_id not in items or event.ts < items[event.item_id]:
            items[event.item_id] = event.ts
            heapq.heappush(self._click_order, (event.ts, event.request_id))

    def add_impression(self, impression: PendingImpression) -> None:
        heapq.heappush(self._pending, (impression.event.ts, next(self._sequence), impression))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def due(
        self, now: float | None = None, max_pending: int | None = None
    ) -> list[PendingImpression]:
        """The impressions whose window has passed, oldest first (taken out of the join),
        and the oldest beyond `max_pending` however recent."""
        now = time.monotonic() if now is None else now
        wait_s = self.window_ms / 1000
        out = []
        while self._pending and (
            self._pending[0][0] + self.window_ms <= self.watermark_ms
            or (max_pending is not None and len(self._pending) > max_pending)
        ):
            out.append(heapq.heappop(self._pending)[2])
        if self._pending:
            # Traffic stopped (the watermark stands still): wall-clock time decides.
            waited = [p for p in self._pending if now - p[2].received_at >= wait_s]
            if waited:
                stay = [p for p in self._pending if now - p[2].received_at < wait_s]
                heapq.heapify(stay)
                self._pending = stay
                out += [p[2] for p in sorted(waited)]
        self._forget_old_clicks()
        return out

    def rows(self, impression: PendingImpression) -> list[dict[str, Any]]:
        """One row per item shown (the impressions table's columns)."""
        event = impression.event
        found = self._clicks.get(event.request_id, {}) if event.request_id else {}
        latest = event.ts + self.window_ms
        clicks = {item: ts for item, ts in found.items() if ts <= latest}
        return [
            {
                "request_id": event.request_id,
                "user_id": event.user_id,
                "item_id": item,
                "ts": event.ts,
                "model_version": event.model_version,
                "clicked": item in clicks,
                "click_ts": clicks.get(item),
                "event_id": event.event_id,
                "position": position,
            }
            for position, item in enumerate(impression.item_ids)
        ]

    def _forget_old_clicks(self) -> None:
        """Clicks older than any impression still to be joined can go (two windows back)."""
        horizon = self.watermark_ms - 2 * self.window_ms
        oldest_pending = self._pending[0][0] if self._pending else horizon
        horizon = min(horizon, oldest_pending - self.window_ms)
        while self._click_order and self._click_order[0][0] < horizon:
            _, request_id = heapq.heappop(self._click_order)
            items = self._clicks.get(request_id)
            if items is not None and max(items.values()) < horizon:
                del self._clicks[request_id]
