"""Rebuilding the feature store from what the interactions topic still holds.

    recsys features rebuild --system-id NS.NAME --interactions-topic ... --redis-url ...

The store is derived data: every key is a fold of the user's events, so it can be
computed again from the events. A Reader reads the topic from its earliest
retained message (it takes no subscription, so the job's position is not
touched) until it has been quiet for `IDLE_MS`, and the events go through
the same `FeatureStore.apply` as the live job's batches. A user's events are on one
partition in the order the job read them, so the result equals an uninterrupted run;
and since the state remembers event ids, a rebuild over a store that already holds
some of the events applies only the others (idempotent, re-runnable). Events the job
would dead-letter (malformed, out of the time bounds, late) are counted, not
dead-lettered again.

The feature job rebuilds by itself at start when the store holds no key of its system
(`rebuild_when_empty`): after Redis lost its data, or for a new store; and when a
rebuild began and never ended (`rebuild_unfinished`: a job killed during it leaves
part of the users, and a store no longer empty). How far back it reaches is the topic's
retention (`spec.events.topics.*.retention`); anything older comes back only from the
offline event log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pulsar

from recsys_contracts import feature_keys as keys
from recsys_contracts.event_wire import decode_event
from recsys_contracts.events import Event, InvalidEvent, check_event_time, now_ms
from recsys_contracts.feature_job_settings import FeatureJobSettings, duration_ms
from stream_jobs.feature_store import FeatureStore, StoreClient
from stream_jobs.item_embeddings import ItemEmbeddings

log = logging.getLogger("stream_jobs.rebuild")

IDLE_MS = 1000
"""A partition that yields nothing for this long has been read to its end."""


@dataclass
class RebuildReport:
    read: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    """applied | duplicate | late | <dead-letter code> -> events."""
    seconds: float = 0.0
    stopped: bool = False
    """Stopped before the topic's end (SIGTERM): the store stays marked as rebuilding."""

    def summary(self) -> str:
        parts = ", ".join(f"{n} {what}" for what, n in sorted(self.outcomes.items()))
        text = f"read {self.read} events in {self.seconds:.1f}s: {parts or 'nothing'}"
        return text + ("; stopped before the end" if self.stopped else "")


def store_is_empty(client: StoreClient, system: str) -> bool:
    """True when the store holds no per-user key and no popular items of `system`, of
    this layout or of v1 (a v1 store is upgraded as its users' events arrive, see
    `feature_keys`, not rebuilt)."""
    for version in (keys.LAYOUT_VERSION, "v1"):
        if client.exists(keys.popular_items_key(system, version)):
            return False
        pattern = keys.user_keys_pattern(system, version)
        if next(iter(client.scan_iter(match=pattern, count=1000)), None) is not None:
            return False
    return True


def rebuild_unfinished(client: StoreClient, system: str) -> bool:
    """True when a rebuild of `system` began and did not end (killed, or failed): the
    store holds part of what it would write (`rebuild` marks the store while it runs)."""
    return bool(client.exists(keys.rebuild_marker_key(system)))


def retained_messages(client: pulsar.Client, topic: str, idle_ms: int = IDLE_MS) -> Iterator[bytes]:
    """Every message `topic` still holds, oldest first per partition. One Reader on the
    topic itself: readers of the single partitions read nothing on pulsar-lite."""
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    try:
        while True:
            try:
                message = reader.read_next(timeout_millis=idle_ms)
            except pulsar.Timeout:
                return
            yield message.data()
    finally:
        reader.close()


def rebuild(
    settings: FeatureJobSettings,
    client: pulsar.Client,
    store: FeatureStore,
    items: Mapping[str, ItemEmbeddings],
    stop: threading.Event | None = None,
) -> RebuildReport:
    """Replay the topic's retention into `store` (see the module docstring). Once `stop`
    is set it returns at the next message, the store still marked (`rebuild_unfinished`),
    so that a job stopped mid-rebuild within its grace period rebuilds again at its next
    start."""
    started = time.monotonic()
    report = RebuildReport()
    max_future, max_past = duration_ms(settings.max_future), duration_ms(settings.max_past)
    batch: list[Event] = []

    def flush() -> None:
        by_user: dict[str, list[Event]] = {}
        for event in batch:
            by_user.setdefault(event.user_id, []).append(event)
        written = store.apply(by_user, items)
        for update in written.updates.values():
            report.outcomes.update(outcome.value for outcome in update.outcomes)
        batch.clear()

    marker: Any = keys.rebuild_marker_key(settings.system_id)
    store.client.set(marker, now_ms())  # until the last event is written (no TTL)
    for payload in retained_messages(client, settings.interactions_topic):
        if stop is not None and stop.is_set():
            report.stopped = True
            report.seconds = time.monotonic() - started
            return report
        report.read += 1
        try:
            event = decode_event(payload)
            check_event_time(event, now_ms(), max_future, max_past)
        except InvalidEvent as problem:
            report.outcomes[problem.code] += 1
            continue
        batch.append(event)
        if len(batch) >= settings.batch_size:
            flush()
    if batch:
        flush()
    store.client.delete(marker)
    report.seconds = time.monotonic() - started
    return report
