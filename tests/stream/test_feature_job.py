"""The feature job against the real broker and Redis, running in a thread of the test.

The reference for every check is the pure computation (`stream_support.expected_content`):
each user's events folded in order. What is tested here is the I/O around it:
batching, grouping, writes, acks, dead letters and failures.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulsar
import pytest
import redis
from stream_support import (
    BASE_TS,
    StoreContent,
    applied_events,
    consume,
    dead_letter,
    expected_content,
    interleave_users,
    known_stream,
    produce,
    produce_events,
    quiet_client,
    running_job,
    sample,
    store_content,
    wait_until,
    write_item_embeddings,
)

from recsys_contracts import feature_keys as keys
from recsys_contracts.events import Event
from recsys_contracts.feature_job_settings import FeatureJobSettings, duration_ms
from recsys_operator.launchers.process import ManagedProcess, free_port
from recsys_operator.launchers.redis_server import redis_process, redis_url
from stream_jobs.dead_letters import MAX_PAYLOAD_BYTES, DeadLetterPublisher
from stream_jobs.features import FeatureJob
from stream_jobs.item_embeddings import EmbeddingCatalog
from stream_jobs.rebuild import rebuild, store_is_empty
from stream_jobs.user_features import FeatureParams

pytestmark = [pytest.mark.broker, pytest.mark.redis]

EVENTS_TOTAL = "recsys_feature_events_total"


def reference(settings: FeatureJobSettings, events: Sequence[Event]) -> StoreContent:
    catalog = EmbeddingCatalog(settings.embeddings_path, settings.model_version)
    catalog.refresh()
    half_life = duration_ms(settings.popular_half_life)
    return expected_content(
        settings.system_id, events, FeatureParams.from_settings(settings), catalog, half_life
    )


def content(
    client: redis.Redis, settings: FeatureJobSettings, expected: StoreContent
) -> StoreContent:
    return store_content(client, settings.system_id, expected.users, ["v1", "v2"])


def matches(client: redis.Redis, settings: FeatureJobSettings, expected: StoreContent) -> bool:
    return content(client, settings, expected).same_as(expected)


def outcome_total(registry: object, outcome: str) -> float:
    types = ["view", "click", "purchase", "dwell", "impression"]
    return sum(sample(registry, EVENTS_TOTAL, {"type": t, "outcome": outcome}) for t in types)


def store_errors(registry: object) -> float:
    labels = {"error": "ConnectionError"}
    return sample(registry, "recsys_feature_store_errors_total", labels)


def test_the_store_holds_the_reference_computation_of_a_known_stream(
    job_settings: FeatureJobSettings, store: redis.Redis, pulsar_url: str, topic: str
) -> None:
    events = interleave_users(known_stream())
    produce_events(pulsar_url, topic, events)
    expected = reference(job_settings, events)
    with running_job(job_settings) as job:
        wait_until(
            lambda: matches(store, job_settings, expected), 30, "the store to match the reference"
        )
        registry = job.metrics.registry
        assert outcome_total(registry, "applied") == len(events)
        clicks = sum(1 for e in events if e.type.value == "click")
        assert sample(registry, EVENTS_TOTAL, {"type": "click", "outcome": "applied"}) == clicks
        assert sample(registry, "recsys_feature_freshness_seconds_count") == len(events)
        assert sample(registry, "recsys_feature_unknown_items_total", {"model_version": "v2"}) > 0
        assert sample(registry, "recsys_feature_item_embeddings", {"model_version": "v1"}) == 30
        assert (
            sample(registry, "recsys_feature_batch_seconds_count")
            >= len(events) / job_settings.batch_size
        )
    # the known stream covers what the checks are about
    user = expected.users["user-0"]
    assert set(user["embeddings"]) == {"v1", "v2"}
    assert int(user["features"][b"count:click:24h"]) > int(user["features"][b"count:click:1h"])
    assert user["features"][b"dwell_mean_ms"] != b""
    # every user's hash expires, with the configured TTL
    ttl_ms = job_settings.store_ttl_seconds * 1000
    for user_id in expected.users:
        key = keys.user_key(job_settings.system_id, user_id)
        assert ttl_ms - 60_000 < store.pttl(key) <= ttl_ms, key


def test_a_replay_of_the_same_events_changes_nothing(
    job_settings: FeatureJobSettings, store: redis.Redis, pulsar_url: str, topic: str
) -> None:
    events = interleave_users(known_stream(users=4, per_user=15, seed=3))
    produce_events(pulsar_url, topic, events)
    expected = reference(job_settings, events)
    with running_job(job_settings) as job:
        wait_until(lambda: matches(store, job_settings, expected), 30, "the first pass")
        before = content(store, job_settings, expected)
        produce_events(pulsar_url, topic, reversed(events))  # replayed, even in another order
        wait_until(
            lambda: outcome_total(job.metrics.registry, "duplicate") == len(events),
            30,
            "the replay",
        )
        assert outcome_total(job.metrics.registry, "applied") == len(events)
    assert content(store, job_settings, expected) == before  # exactly, popular scores included


def test_malformed_events_are_dead_lettered_with_reasons_and_block_nothing(
    job_settings: FeatureJobSettings, store: redis.Redis, pulsar_url: str, topic: str
) -> None:
    good = known_stream(users=2, per_user=8, seed=5)
    valid = json.loads(good[0].to_json())
    no_ts = {k: v for k, v in valid.items() if k != "ts"}
    bad = [
        ("user-0", b"{not json"),
        ("user-1", json.dumps(no_ts).encode()),
        ("user-0", json.dumps({**valid, "event_id": "future", "ts": 90_000_000_000_000}).encode()),
        ("", b"\xff\xfe binary"),
    ]
    # bad events first, on both partitions, then the good ones behind them
    produce(pulsar_url, topic, [*bad, *((e.user_id, e.to_json()) for e in good)])
    expected = reference(job_settings, good)
    with running_job(job_settings) as job:
        wait_until(lambda: matches(store, job_settings, expected), 30, "the good events")
        letters = [
            dead_letter(m) for m in _consume_dead_letters(pulsar_url, job_settings, len(bad))
        ]
        registry = job.metrics.registry
        dead = {
            code: sample(registry, "recsys_feature_dead_letters_total", {"reason": code})
            for code in ("not_json", "invalid_field", "future_ts")
        }
    assert dead == {"not_json": 2, "invalid_field": 1, "future_ts": 1}
    by_payload = {letter["payload"]: letter for letter in letters}
    assert by_payload["{not json"]["code"] == "not_json"
    assert "ts: Field required" in by_payload[json.dumps(no_ts)]["reason"]
    assert "in the future" in next(x for x in letters if x["code"] == "future_ts")["reason"]
    binary = next(x for x in letters if x.get("payload_encoding") == "base64")
    assert binary["key"] is None
    for letter in letters:
        assert letter["topic"].startswith(topic)
        assert letter["message_id"].startswith("(")
        assert letter["subscription"] == job_settings.subscription


def test_a_dead_letter_the_broker_refuses_is_sent_again_until_it_is_stored(
    job_settings: FeatureJobSettings, pulsar_url: str
) -> None:
    """The dead-letter producer fails (closed here; a broker refusing or timing out the
    sends alike): the job keeps the bad message unacked and sends its dead letter again,
    with backoff, until the broker stores it, then acks it. (A message left unacked with
    a live consumer is neither dead-lettered nor redelivered until that consumer goes.)"""
    produce(pulsar_url, job_settings.interactions_topic, [("user-0", b"{not json")])
    job = FeatureJob(job_settings)
    client = quiet_client(pulsar_url)
    stop = threading.Event()
    try:
        consumer = job._subscribe(client)
        refusing = client.create_producer(job_settings.dead_letters)
        refusing.close()
        dead_letters = DeadLetterPublisher(refusing, job_settings.subscription)
        messages = wait_until(lambda: list(consumer.batch_receive()), 10, "the bad message")
        done: list[bool] = []
        thread = threading.Thread(
            target=lambda: done.append(job.process_batch(consumer, dead_letters, messages, stop))
        )
        thread.start()
        time.sleep(0.5)  # a few refused sends
        dead_letters.producer = client.create_producer(
            job_settings.dead_letters, batching_enabled=False
        )
        thread.join(20)
        assert done == [True]
        letters = consume(pulsar_url, job_settings.dead_letters, count=1, timeout=10)
        assert [dead_letter(m)["code"] for m in letters] == ["not_json"]
        reason = {"reason": "not_json"}
        assert sample(job.metrics.registry, "recsys_feature_dead_letters_total", reason) == 1
        consumer.close()
        consumer = job._subscribe(client)  # the bad message was acked: it does not come back
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert not list(consumer.batch_receive())
        consumer.close()
    finally:
        stop.set()
        client.close()


def test_the_events_of_a_user_whose_state_cannot_be_read_are_dead_lettered(
    job_settings: FeatureJobSettings, store: redis.Redis, pulsar_url: str, topic: str
) -> None:
    """A user's hash holds a `state` this job cannot decode (a newer job's format, after
    a rollback; another writer's bytes): that user's events go to the dead-letter topic
    with code `unreadable_state` and the reason, their hash stays as it was (for a job
    that reads it to take the replayed letters), and every other user's events are
    applied (it ended the job's loop at every batch holding that user)."""
    events = known_stream(users=3, per_user=8, seed=19)
    stuck = "user-1"
    foreign = b"\x00\x05a newer format"
    key = keys.user_key(job_settings.system_id, stuck)
    store.hset(key, "state", foreign)
    produce_events(pulsar_url, topic, events)
    expected = reference(job_settings, [e for e in events if e.user_id != stuck])
    theirs = sum(e.user_id == stuck for e in events)
    unreadable = {"reason": "unreadable_state"}
    with running_job(job_settings) as job:
        wait_until(lambda: matches(store, job_settings, expected), 30, "the other users' events")
        registry = job.metrics.registry
        wait_until(
            lambda: sample(registry, "recsys_feature_dead_letters_total", unreadable) == theirs,
            30,
            "the stuck user's events dead-lettered",
        )
        late = outcome_total(registry, "late")
    letters = [
        dead_letter(m) for m in _consume_dead_letters(pulsar_url, job_settings, theirs + int(late))
    ]
    stuck_letters = [x for x in letters if x["code"] == "unreadable_state"]
    assert len(stuck_letters) == theirs
    assert all(x["key"] == stuck and stuck in x["reason"] for x in stuck_letters)
    assert store.hgetall(key) == {b"state": foreign}


def test_a_message_too_big_for_its_whole_dead_letter_is_dead_lettered_cut_short(
    job_settings: FeatureJobSettings, store: redis.Redis, pulsar_url: str, topic: str
) -> None:
    """4 MiB of junk fit the topic, but not a dead letter holding them (in base64, a third
    larger): the broker refuses that letter for good (MessageTooBig). The letter keeps the
    payload's first MAX_PAYLOAD_BYTES and says so, with the payload's size (the message is
    still in the topic, which the letter names with its id, for the topic's retention),
    and the job goes on with the events behind it."""
    junk = bytes(range(256)) * (4 * 4096)  # 4 MiB, not UTF-8
    good = known_stream(users=1, per_user=3, seed=29)
    produce(pulsar_url, topic, [("user-0", junk)])
    produce_events(pulsar_url, topic, good)
    expected = reference(job_settings, good)
    with running_job(job_settings) as job:
        wait_until(lambda: matches(store, job_settings, expected), 30, "the events behind it")
        reason = {"reason": "not_json"}
        wait_until(
            lambda: sample(job.metrics.registry, "recsys_feature_dead_letters_total", reason),
            30,
            "the junk dead-lettered",
        )
    (letter,) = [dead_letter(m) for m in _consume_dead_letters(pulsar_url, job_settings, 1)]
    kept = MAX_PAYLOAD_BYTES
    assert letter["code"] == "not_json" and letter["payload_encoding"] == "base64"
    assert letter["payload_truncated"] is True and letter["payload_bytes"] == len(junk)
    assert base64.b64decode(letter["payload"]) == junk[:kept]


def _consume_dead_letters(url: str, settings: FeatureJobSettings, count: int) -> list[Any]:
    letters = consume(url, settings.dead_letters, count, timeout=20)
    assert len(letters) == count
    return letters


# --- Redis going away ---------------------------------------------------------------


@dataclass
class RestartableRedis:
    """A redis-server of this test on a fixed port, so it can be stopped and started again."""

    run_dir: Path
    port: int
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = redis_process(self.run_dir, port=self.port).start()

    def stop_keeping_data(self) -> None:
        """SAVE (the server runs without persistence otherwise), then stop it by its PID."""
        assert self.process is not None
        redis.Redis.from_url(redis_url(self.process)).save()
        self.process.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path, free_port())
    server.start()
    yield server
    if server.process is not None:
        server.process.stop()


def test_events_sent_while_redis_is_down_are_applied_when_it_returns(
    job_settings: FeatureJobSettings, own_redis: RestartableRedis, pulsar_url: str, topic: str
) -> None:
    settings = job_settings.model_copy(update={"redis_url": own_redis.url})
    events = interleave_users(known_stream(users=4, per_user=20, seed=11))
    first, second = events[:40], events[40:]
    client = redis.Redis.from_url(own_redis.url)
    produce_events(pulsar_url, topic, first)
    with running_job(settings) as job:
        wait_until(
            lambda: matches(client, settings, reference(settings, first)), 30, "the first half"
        )
        own_redis.stop_keeping_data()
        produce_events(pulsar_url, topic, second)
        wait_until(
            lambda: store_errors(job.metrics.registry) >= 3,
            30,
            "the job to retry the failing store",
        )
        own_redis.start()
        wait_until(
            lambda: matches(client, settings, reference(settings, events)),
            30,
            "every event after the outage",
        )
        assert outcome_total(job.metrics.registry, "applied") == len(events)


def test_a_job_stopped_while_redis_is_down_leaves_its_batch_unacked(
    job_settings: FeatureJobSettings, own_redis: RestartableRedis, pulsar_url: str, topic: str
) -> None:
    settings = job_settings.model_copy(
        update={"redis_url": own_redis.url, "drain_timeout": "500ms"}
    )
    events = interleave_users(known_stream(users=3, per_user=10, seed=13))
    own_redis.stop_keeping_data()
    produce_events(pulsar_url, topic, events)
    with running_job(settings) as job:
        wait_until(
            lambda: store_errors(job.metrics.registry) >= 1, 30, "the job to meet the failing store"
        )
    # stopped (drain timeout passed) without acking: a new job gets every event
    own_redis.start()
    client = redis.Redis.from_url(own_redis.url)
    with running_job(settings):
        wait_until(
            lambda: matches(client, settings, reference(settings, events)), 30, "every event"
        )


@pytest.mark.parametrize("refusal", ["OutOfMemoryError", "ReadOnlyError"])
def test_a_store_that_refuses_writes_for_a_while_is_waited_out_and_loses_nothing(
    job_settings: FeatureJobSettings,
    own_redis: RestartableRedis,
    pulsar_url: str,
    topic: str,
    refusal: str,
) -> None:
    """A Redis at its `maxmemory` (noeviction, so that no user's state is evicted) refuses
    every write with OOM until keys expire or it is given more memory; one made a replica
    (a failover) refuses them with READONLY. The job retries the batch meanwhile
    (counted, nothing acked) and applies every event once it can write, instead of dying
    on the first refusal (restarted, it would meet the same one)."""
    settings = job_settings.model_copy(update={"redis_url": own_redis.url})
    events = interleave_users(known_stream(users=3, per_user=10, seed=17))
    client = redis.Redis.from_url(own_redis.url)
    if refusal == "OutOfMemoryError":
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")  # less than it already uses: writes refused
    else:
        client.replicaof("127.0.0.1", str(free_port()))  # a primary that never answers
    produce_events(pulsar_url, topic, events)
    with running_job(settings) as job:
        wait_until(
            lambda: (
                sample(
                    job.metrics.registry, "recsys_feature_store_errors_total", {"error": refusal}
                )
                >= 2
            ),
            30,
            "the job to retry the refused write",
        )
        assert applied_events(client, settings.system_id, {e.user_id for e in events}) == 0
        if refusal == "OutOfMemoryError":
            client.config_set("maxmemory", "0")
        else:
            client.replicaof("NO", "ONE")
        wait_until(
            lambda: matches(client, settings, reference(settings, events)),
            30,
            "every event once Redis takes writes again",
        )
        assert outcome_total(job.metrics.registry, "applied") == len(events)


def test_a_new_model_version_on_disk_is_loaded_as_soon_as_events_name_it(
    job_settings: FeatureJobSettings,
    store: redis.Redis,
    pulsar_url: str,
    topic: str,
    tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    write_item_embeddings(root / "v1", ["i1", "i2"], dim=4, seed=1)
    settings = job_settings.model_copy(update={"embeddings_path": root, "embeddings_reload": "1h"})
    system = settings.system_id

    def event(n: int, user: str, version: str) -> Event:
        return Event(
            event_id=f"e{n}",
            user_id=user,
            item_id="i1",
            type="click",
            ts=BASE_TS + n,
            model_version=version,
        )

    with running_job(settings) as job:
        produce_events(pulsar_url, topic, [event(1, "a", "v1")])
        wait_until(
            lambda: store.hexists(keys.user_key(system, "a"), "emb:v1"), 30, "v1's embedding"
        )
        write_item_embeddings(root / "v2", ["i1"], dim=3, seed=2)  # a rollout starts
        produce_events(pulsar_url, topic, [event(2, "b", "v2")])
        wait_until(
            lambda: store.hexists(keys.user_key(system, "b"), "emb:v2"), 30, "v2's embedding"
        )
        assert (
            sample(job.metrics.registry, "recsys_feature_item_embeddings", {"model_version": "v2"})
            == 1
        )
    assert len(store.hget(keys.user_key(system, "b"), "emb:v2") or b"") == 3 * 4


def test_an_idle_job_reopens_its_subscription_and_misses_nothing(
    job_settings: FeatureJobSettings, store: redis.Redis, pulsar_url: str, topic: str
) -> None:
    settings = job_settings.model_copy(update={"resubscribe_idle": "200ms"})
    events = interleave_users(known_stream(users=3, per_user=10, seed=23))
    first, second = events[:15], events[15:]
    with running_job(settings) as job:
        produce_events(pulsar_url, topic, first)
        wait_until(
            lambda: matches(store, settings, reference(settings, first)), 30, "the first half"
        )
        resubscribes = "recsys_feature_resubscribes_total"
        wait_until(
            lambda: sample(job.metrics.registry, resubscribes) >= 2, 30, "two idle reopenings"
        )
        produce_events(pulsar_url, topic, second)
        wait_until(
            lambda: matches(store, settings, reference(settings, events)), 30, "the second half"
        )
        assert outcome_total(job.metrics.registry, "applied") == len(events)
        assert outcome_total(job.metrics.registry, "duplicate") == 0


# --- event time ---------------------------------------------------------------------


def test_events_within_the_lateness_apply_in_place_and_later_ones_are_dead_lettered(
    job_settings: FeatureJobSettings, store: redis.Redis, pulsar_url: str, topic: str
) -> None:
    settings = job_settings.model_copy(update={"allowed_lateness": "10m", "max_past": "400d"})
    minute = 60_000

    def click(n: int, ts: int) -> Event:
        return Event(event_id=f"t{n}", user_id="late-user", item_id=f"i{n}", type="click", ts=ts)

    newest = click(1, BASE_TS + 60 * minute)
    in_time = click(2, BASE_TS + 51 * minute)  # 9 minutes behind: applied in its place
    too_late = click(3, BASE_TS + 45 * minute)  # 15 minutes behind
    ancient = click(4, BASE_TS - 401 * 1440 * minute)  # past max_past
    produce_events(pulsar_url, topic, [newest, in_time, too_late, ancient])
    expected = reference(settings, [newest, in_time])
    with running_job(settings) as job:
        wait_until(lambda: matches(store, settings, expected), 30, "the events in time")
        letters = [dead_letter(m) for m in _consume_dead_letters(pulsar_url, settings, 2)]
        registry = job.metrics.registry
        dead = {
            code: sample(registry, "recsys_feature_dead_letters_total", {"reason": code})
            for code in ("late", "past_ts")
        }
        late_outcomes = outcome_total(registry, "late")
    assert dead == {"late": 1, "past_ts": 1} and late_outcomes == 1
    by_code = {letter["code"]: json.loads(letter["payload"]) for letter in letters}
    assert by_code["late"]["event_id"] == "t3" and by_code["past_ts"]["event_id"] == "t4"
    recent = keys.decode_recent(
        store.hget(keys.user_key(settings.system_id, "late-user"), "recent")
    )
    assert recent == ["i1", "i2"]


# --- state that survives and can be rebuilt ------------------------------------------


def test_redis_killed_mid_stream_comes_back_with_every_users_state(
    job_settings: FeatureJobSettings, own_redis: RestartableRedis, pulsar_url: str, topic: str
) -> None:
    """kill -9 of redis-server (append-only file, fsync every second): after the restart
    the store holds everything acked before the kill and what arrived meanwhile."""
    settings = job_settings.model_copy(update={"redis_url": own_redis.url})
    stream = interleave_users(known_stream(users=4, per_user=20, seed=11))
    before, during = stream[:50], stream[50:]
    client = redis.Redis.from_url(own_redis.url)
    with running_job(settings):
        produce_events(pulsar_url, topic, before)
        expected_before = reference(settings, before)
        wait_until(lambda: matches(client, settings, expected_before), 30, "the first events")
        popen = own_redis.process.popen if own_redis.process else None
        assert popen is not None
        popen.kill()  # SIGKILL: no SAVE, no shutdown hook
        popen.wait(10)
        produce_events(pulsar_url, topic, during)
        time.sleep(0.5)
        own_redis.start()
        expected = reference(settings, stream)
        wait_until(lambda: matches(client, settings, expected), 40, "every event after the restart")


def test_a_wiped_store_is_rebuilt_from_the_topic_equal_to_an_uninterrupted_run(
    job_settings: FeatureJobSettings, store: redis.Redis, pulsar_url: str, topic: str
) -> None:
    stream = interleave_users(known_stream(users=5, per_user=20, seed=3))
    produce_events(pulsar_url, topic, stream)
    expected = reference(job_settings, stream)
    with running_job(job_settings):
        wait_until(lambda: matches(store, job_settings, expected), 30, "the uninterrupted run")
    uninterrupted = content(store, job_settings, expected)

    def wipe() -> None:
        for key in store.scan_iter(
            match=f"recsys:{keys.LAYOUT_VERSION}:{job_settings.system_id}:*"
        ):
            store.delete(key)

    wipe()
    assert store_is_empty(store, job_settings.system_id)
    job = FeatureJob(job_settings, store_client=store)
    job.catalog.refresh()
    client = pulsar.Client(pulsar_url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn))
    try:
        report = rebuild(job_settings, client, job.store, job.catalog.versions)
        assert report.read == len(stream) and report.outcomes["applied"] == len(stream)
        assert content(store, job_settings, expected).same_as(uninterrupted)
        again = rebuild(job_settings, client, job.store, job.catalog.versions)  # idempotent
        assert again.outcomes["applied"] == 0
        assert content(store, job_settings, expected).same_as(uninterrupted)
    finally:
        client.close()

    # The job does it by itself when it starts on an empty store.
    wipe()
    with running_job(job_settings.model_copy(update={"rebuild_when_empty": True})):
        wait_until(lambda: matches(store, job_settings, expected), 30, "the rebuild at start")
    assert content(store, job_settings, expected).same_as(uninterrupted)
