"""Helpers of the stream-job tests: event streams, the reference computation of
the feature store's content, a snapshot of what Redis holds, and polling."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pulsar
import redis

from recsys_contracts import feature_keys as keys
from recsys_contracts.events import Event, EventType
from recsys_contracts.feature_job_settings import FeatureJobSettings
from stream_jobs.features import FeatureJob
from stream_jobs.item_embeddings import IDS_FILE, VECTORS_FILE, EmbeddingCatalog
from stream_jobs.user_features import (
    FeatureParams,
    UserState,
    encode_state,
    feature_fields,
    popular_weight,
    recent_item_ids,
    update_user,
)

T = TypeVar("T")
BASE_TS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@contextmanager
def running_job(settings: FeatureJobSettings) -> Iterator[FeatureJob]:
    """A FeatureJob consuming in a thread; stopped (and joined) on exit."""
    job = FeatureJob(settings)
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            job.run(stop, ready)
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=target, name="feature-job", daemon=True)
    thread.start()
    assert ready.wait(30), "the feature job did not subscribe within 30s"
    if errors:
        raise errors[0]
    try:
        yield job
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the feature job did not stop within 30s"
    if errors:
        raise errors[0]


def quiet_client(url: str) -> pulsar.Client:
    return pulsar.Client(url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn))


def known_stream(users: int = 6, per_user: int = 25, seed: int = 7) -> list[Event]:
    """A deterministic mixed stream: every type, dwell times, unknown items, a few
    events out of order by seconds, and gaps long enough to start new sessions
    and to move events out of the 1h window."""
    import random

    rng = random.Random(seed)
    types = [
        EventType.VIEW,
        EventType.CLICK,
        EventType.PURCHASE,
        EventType.DWELL,
        EventType.IMPRESSION,
    ]
    events = []
    for u in range(users):
        ts = BASE_TS + u * 1000
        for n in range(per_user):
            ts += rng.choice([2_000, 30_000, 600_000, 2_400_000])  # up to 40 minutes apart
            jitter = -rng.randrange(1, 20_000) if n % 7 == 3 else 0  # a little out of order
            kind = rng.choice(types)
            events.append(
                Event(
                    event_id=f"e-{u}-{n}",
                    user_id=f"user-{u}",
                    item_id=f"i{rng.randrange(34)}",  # i30..i33 have no embedding
                    type=kind,
                    ts=ts + jitter,
                    dwell_ms=rng.randrange(100, 60_000) if kind is EventType.DWELL else None,
                    request_id=f"r-{n}",
                    model_version="v1",
                )
            )
    return events


def interleave_users(events: Sequence[Event]) -> list[Event]:
    """The events in round-robin order across users (each user's own order kept)."""
    by_user: dict[str, list[Event]] = {}
    for event in events:
        by_user.setdefault(event.user_id, []).append(event)
    queues = list(by_user.values())
    out: list[Event] = []
    while any(queues):
        for queue in queues:
            if queue:
                out.append(queue.pop(0))
    return out


def produce(url: str, topic: str, payloads: Iterable[tuple[str, bytes]]) -> int:
    """Send (key, payload) pairs, keyed; wait until the broker stored them all."""
    client = quiet_client(url)
    try:
        producer = client.create_producer(
            topic, batching_enabled=True, batching_max_publish_delay_ms=5
        )
        count = 0
        for key, payload in payloads:
            if key:
                producer.send_async(payload, None, partition_key=key)
            else:
                producer.send_async(payload, None)
            count += 1
        producer.flush()
        producer.close()
        return count
    finally:
        client.close()


def produce_events(url: str, topic: str, events: Iterable[Event]) -> int:
    return produce(url, topic, ((e.user_id, e.to_json()) for e in events))


def consume(url: str, topic: str, count: int, timeout: float) -> list[pulsar.Message]:
    """Read `count` messages of `topic` from its start (a subscription of our own)."""
    client = quiet_client(url)
    received: list[pulsar.Message] = []
    try:
        consumer = client.subscribe(
            topic,
            f"reader-{time.monotonic_ns()}",
            consumer_type=pulsar.ConsumerType.Shared,
            initial_position=pulsar.InitialPosition.Earliest,
        )
        deadline = time.monotonic() + timeout
        while len(received) < count and time.monotonic() < deadline:
            try:
                message = consumer.receive(timeout_millis=200)
            except pulsar.Timeout:
                continue
            received.append(message)
            consumer.acknowledge(message)
        consumer.close()
    finally:
        client.close()
    return received


def write_item_embeddings(directory: Path, item_ids: list[str], dim: int, seed: int) -> np.ndarray:
    """Random item embeddings in the archive layout; returns the matrix."""
    directory.mkdir(parents=True, exist_ok=True)
    vectors = np.random.default_rng(seed).normal(size=(len(item_ids), dim)).astype(np.float32)
    np.save(directory / VECTORS_FILE, vectors)
    (directory / IDS_FILE).write_text(json.dumps(item_ids))
    return vectors


# --- what the store should hold ----------------------------------------------------


@dataclass
class StoreContent:
    """Everything a system's keys hold for some users, comparable with `==`."""

    users: dict[str, dict[str, Any]]
    popular: dict[bytes, float]

    def same_as(self, other: StoreContent) -> bool:
        """Equal, with popular scores within float rounding (batches sum them in other orders)."""
        if self.users != other.users or set(self.popular) != set(other.popular):
            return False
        return all(
            abs(self.popular[k] - other.popular[k]) <= 1e-9 * abs(self.popular[k])
            for k in self.popular
        )


def expected_content(
    system: str,
    events: Sequence[Event],
    params: FeatureParams,
    catalog: EmbeddingCatalog,
    half_life_ms: int,
) -> StoreContent:
    """The reference: each user's events folded in arrival order with the pure functions."""
    by_user: dict[str, list[Event]] = {}
    for event in events:
        by_user.setdefault(event.user_id, []).append(event)
    users: dict[str, dict[str, Any]] = {}
    popular: dict[bytes, float] = {}
    for user, user_events in by_user.items():
        update = update_user(
            UserState(), dict.fromkeys(catalog.versions), user_events, params, catalog.versions
        )
        users[user] = {
            "state": encode_state(update.state),
            "recent": [i.encode() for i in recent_item_ids(update.state, params)],
            "features": {
                k.encode(): v.encode() for k, v in feature_fields(update.state, params).items()
            },
            "embeddings": {v: keys.encode_embedding(vec) for v, vec in update.embeddings.items()},
            "seen": {item.encode() for item, _ in update.touched_items},
        }
        for item, ts in update.touched_items:
            popular[item.encode()] = popular.get(item.encode(), 0.0) + popular_weight(
                ts, keys.POPULAR_EPOCH_MS, half_life_ms
            )
    return StoreContent(users, popular)


def store_content(
    client: redis.Redis, system: str, users: Iterable[str], versions: Iterable[str]
) -> StoreContent:
    """What Redis holds for `users` of `system` (missing embeddings left out), in the
    shape of `expected_content`: the user hash split into its parts."""
    versions = list(versions)
    content: dict[str, dict[str, Any]] = {}
    for user in users:
        fields = client.hgetall(keys.user_key(system, user))
        embeddings = {}
        for version in versions:
            data = fields.pop(keys.embedding_field(version).encode(), None)
            if data is not None:
                embeddings[version] = data
        seen = {name[len(keys.SEEN_PREFIX) :] for name in fields if name.startswith(b"seen:")}
        recent = fields.pop(keys.RECENT_FIELD.encode(), None)
        features = keys.decode_features(fields.pop(keys.FEATURES_FIELD.encode(), None))
        content[user] = {
            "state": fields.pop(keys.STATE_FIELD.encode(), None),
            "recent": [item.encode() for item in keys.decode_recent(recent)],
            "features": {k.encode(): v.encode() for k, v in features.items()},
            "embeddings": embeddings,
            "seen": seen,
        }
    popular = dict(client.zrange(keys.popular_items_key(system), 0, -1, withscores=True))
    return StoreContent(content, popular)


def applied_events(client: redis.Redis, system: str, users: Iterable[str]) -> int:
    """Events applied so far for `users`, from their `events` feature."""
    total = 0
    for user in users:
        features = keys.decode_features(client.hget(keys.user_key(system, user), "features"))
        total += int(features.get("events") or 0)
    return total


def sample(registry: Any, name: str, labels: dict[str, str] | None = None) -> float:
    """A metric sample of an in-process job (0 when it was never set)."""
    return float(registry.get_sample_value(name, labels or {}) or 0.0)


def dead_letter(message: pulsar.Message) -> dict[str, Any]:
    return json.loads(message.data())
