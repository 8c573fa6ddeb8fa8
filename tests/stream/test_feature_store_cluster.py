"""The feature store on a real 3-primary Redis Cluster (loopback), against the same
batches on the single redis-server: a batch splits per hash slot, each slot group is
its own optimistic transaction, and the popular zset (one slot) is counted exactly
even when the job dies between the popular write and the users' write."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from stream_support import (
    BASE_TS,
    StoreContent,
    expected_content,
    interleave_users,
    known_stream,
    produce_events,
    running_job,
    store_content,
    wait_until,
)

from recsys_contracts import feature_keys as keys
from recsys_contracts.events import Event
from recsys_contracts.feature_job_settings import FeatureJobSettings
from recsys_contracts.store_endpoint import StoreEndpoint, StoreMode
from recsys_operator.launchers.redis_server import RedisClusterProcesses, redis_cluster
from stream_jobs.feature_store import FeatureStore, StoreLayout
from stream_jobs.features import STORE_ERRORS, store_persistence
from stream_jobs.item_embeddings import EmbeddingCatalog, ItemEmbeddings
from stream_jobs.rebuild import store_is_empty
from stream_jobs.user_features import (
    FeatureParams,
    Outcome,
    UserState,
    decode_state,
    encode_state,
    popular_weight,
    update_user,
    view,
)

pytestmark = pytest.mark.redis

PARAMS = FeatureParams()
HALF_LIFE_MS = 7 * 86_400_000
TYPES = ["view", "click", "purchase", "dwell", "impression"]


@pytest.fixture
def cluster(redis_cluster_nodes: RedisClusterProcesses) -> Iterator[RedisCluster]:
    endpoint = StoreEndpoint(redis_cluster_nodes.url, StoreMode.CLUSTER)
    client = endpoint.connect(socket_timeout=5, socket_connect_timeout=2)
    yield client
    client.close()


@pytest.fixture(params=["single", "cluster"])
def any_store(request: pytest.FixtureRequest) -> Any:
    """The session's single redis-server, or the cluster: the same code path on both."""
    return request.getfixturevalue("store" if request.param == "single" else "cluster")


@pytest.fixture
def items(embeddings_root: Path) -> Mapping[str, ItemEmbeddings]:
    catalog = EmbeddingCatalog(embeddings_root)
    catalog.refresh()
    return catalog.versions


def stream(users: int, per_user: int, seed: int) -> list[Event]:
    """Interleaved events of many users (so a batch spans many slots), each user's in
    time order, a dwell with its duration now and then."""
    rng = random.Random(seed)
    events = []
    for u in range(users):
        for n in range(per_user):
            kind = rng.choice(TYPES)
            events.append(
                Event(
                    event_id=f"e{u}-{n}",
                    user_id=f"user-{u}",
                    item_id=f"i{rng.randrange(30)}",
                    type=kind,
                    ts=BASE_TS + n * 60_000 + u,
                    dwell_ms=rng.randrange(100, 9000) if kind == "dwell" else None,
                )
            )
    events.sort(key=lambda e: (e.ts, e.user_id))
    return events


def batches(events: Sequence[Event], size: int) -> list[dict[str, list[Event]]]:
    """The job's batches: `size` events in arrival order, grouped by user."""
    out = []
    for start in range(0, len(events), size):
        by_user: dict[str, list[Event]] = {}
        for event in events[start : start + size]:
            by_user.setdefault(event.user_id, []).append(event)
        out.append(by_user)
    return out


def feature_store(client: Any, system: str) -> FeatureStore:
    return FeatureStore(client, StoreLayout(system, 600_000, HALF_LIFE_MS), PARAMS)


def content(client: Any, system: str, events: Sequence[Event]) -> StoreContent:
    users = dict.fromkeys(e.user_id for e in events)
    return store_content(client, system, users, ["v1", "v2"])


def reference(system: str, events: Sequence[Event], embeddings_root: Path) -> StoreContent:
    catalog = EmbeddingCatalog(embeddings_root)
    catalog.refresh()
    return expected_content(system, events, PARAMS, catalog, HALF_LIFE_MS)


def test_a_batch_spanning_many_slots_leaves_what_the_single_node_holds(
    cluster: RedisCluster,
    store: redis.Redis,
    system: str,
    items: Mapping[str, ItemEmbeddings],
    embeddings_root: Path,
) -> None:
    events = stream(users=120, per_user=6, seed=11)
    users = {e.user_id for e in events}
    slots = {key_slot(keys.user_key(system, u).encode()) for u in users}
    nodes = {cluster.get_node_from_key(keys.user_key(system, u)).name for u in users}
    assert len(slots) > 100 and len(nodes) == 3  # the batches really cross slots and nodes
    for client in (cluster, store):
        writer = feature_store(client, system)
        for batch in batches(events, 250):
            writer.apply(batch, items)
    on_cluster = content(cluster, system, events)
    on_single = content(store, system, events)
    assert on_cluster.users == on_single.users  # exactly
    assert on_cluster.same_as(on_single)  # popular: sums in another order (transactions)
    assert on_cluster.same_as(reference(system, events, embeddings_root))
    for node in cluster.get_primaries():  # every primary holds its share of the users
        assert cluster.dbsize(target_nodes=node) > 0


def test_a_replay_changes_nothing_on_the_cluster(
    cluster: RedisCluster, system: str, items: Mapping[str, ItemEmbeddings]
) -> None:
    events = stream(users=60, per_user=5, seed=3)
    for batch in batches(events, 100):
        feature_store(cluster, system).apply(batch, items)
    before = content(cluster, system, events)
    replayer = feature_store(cluster, system)  # another consumer, redelivered in another order
    for batch in batches(list(reversed(events)), 70):
        written = replayer.apply(batch, items)
        assert all(o is Outcome.DUPLICATE for u in written.updates.values() for o in u.outcomes)
    assert content(cluster, system, events) == before


def test_popular_is_exact_after_a_crash_between_the_popular_and_the_users_write(
    cluster: RedisCluster, system: str, items: Mapping[str, ItemEmbeddings]
) -> None:
    """On a cluster popular is its own write, before the users' (on one primary it is in
    the users' transaction: tests/stream/test_feature_store.py)."""
    any_store = cluster
    events = stream(users=40, per_user=5, seed=5)
    batch = batches(events, len(events))[0]
    uninterrupted = f"{system}-ref"
    feature_store(any_store, uninterrupted).apply(batch, items)

    crashing = feature_store(any_store, system)
    write = crashing._write

    def die_before_writing_users(*args: object, **kwargs: object) -> object:
        raise redis.ConnectionError("the job died here")

    crashing._write = die_before_writing_users  # type: ignore[method-assign, assignment]
    with pytest.raises(redis.ConnectionError):
        crashing.apply(batch, items)
    popular = keys.popular_items_key(system)
    assert any_store.zcard(popular) > 0  # popular was counted...
    assert not any(any_store.exists(keys.user_key(system, u)) for u in batch)  # ...users not

    crashing._write = write  # type: ignore[method-assign]
    crashing.apply(batch, items)  # the job retries the batch
    feature_store(any_store, system).apply(batch, items)  # and another consumer gets it again
    # neither lost nor counted twice: as if nothing had happened
    assert content(any_store, system, events) == content(any_store, uninterrupted, events)
    # Once a batch's users are written, the next one drops its events from the record.
    record = keys.popular_applied_key(system)
    assert any_store.zcard(record) > 0
    later = Event(event_id="late", user_id="user-0", item_id="i1", type="click", ts=BASE_TS * 2)
    crashing.apply({"user-0": [later]}, items)
    assert any_store.zrange(record, 0, -1) == [b"6:user-0:late"]
    assert record.startswith(
        f"recsys:{keys.LAYOUT_VERSION}:{system}:"
    )  # a wipe by prefix takes it along
    assert 0 < any_store.pttl(record) <= 24 * 3_600_000


def test_a_v1_store_is_upgraded_with_nothing_lost(
    any_store: Any, system: str, items: Mapping[str, ItemEmbeddings]
) -> None:
    """What a v1 job left (five keys a user, v1 popular and its record of counted events)
    carries over: the state's idempotence and windows, the whole seen set, the
    embeddings, popular's scores; an event a v1 job counted just before it stopped is
    applied to its user but not counted again."""
    ttl = 600_000
    earlier = [_click("e1", "u", 1), _click("e2", "u", 2)]
    v1 = update_user(UserState(), dict.fromkeys(items), earlier, PARAMS, items)
    any_store.set(keys.v1_state_key(system, "u"), encode_state(v1.state), px=ttl)
    any_store.sadd(keys.v1_seen_items_key(system, "u"), "i1", "old-item")
    for version, vector in v1.embeddings.items():
        any_store.set(keys.v1_embedding_key(system, "u", version), keys.encode_embedding(vector))
    any_store.zadd(keys.popular_items_key(system, "v1"), {"i1": 5.0, "old-item": 3.0})
    now_ms = any_store.time()[0] * 1000
    counted = "1:w:ew"  # w's event, counted into v1 popular; w's write never committed
    any_store.zadd(keys.popular_applied_key(system, "v1"), {counted: now_ms})
    assert not store_is_empty(any_store, system)  # upgraded, not rebuilt from the topic

    later = _click("e3", "u", 3)
    written = feature_store(any_store, system).apply(
        {"u": [earlier[1], later], "w": [_view("ew", "w")]}, items
    )
    assert written.updates["u"].outcomes == [Outcome.DUPLICATE, Outcome.APPLIED]
    assert written.updates["w"].outcomes == [Outcome.APPLIED]
    stored = store_content(any_store, system, ["u"], ["v1", "v2"]).users["u"]
    assert stored["seen"] == {b"i1", b"old-item"}
    assert view(decode_state(stored["state"]), PARAMS).events_applied == 3
    uninterrupted = update_user(UserState(), dict.fromkeys(items), [*earlier, later], PARAMS, items)
    assert stored["embeddings"] == {
        v: keys.encode_embedding(vector) for v, vector in uninterrupted.embeddings.items()
    }
    popular = dict(any_store.zrange(keys.popular_items_key(system), 0, -1, withscores=True))
    weight = popular_weight(later.ts, keys.POPULAR_EPOCH_MS, HALF_LIFE_MS)
    assert popular.keys() == {b"i1", b"old-item"}  # w's view of i2 was counted by v1
    assert popular[b"i1"] == pytest.approx(5.0 + weight) and popular[b"old-item"] == 3.0
    assert 0 < any_store.pttl(keys.user_key(system, "u")) <= 600_000


def test_a_concurrent_writer_makes_only_its_slot_group_retry(
    cluster: RedisCluster, system: str, items: Mapping[str, ItemEmbeddings]
) -> None:
    first, other = feature_store(cluster, system), feature_store(cluster, system)
    users = [f"user-{n}" for n in range(12)]
    assert len({key_slot(keys.user_key(system, u).encode()) for u in users}) == len(users)
    computed: list[list[str]] = []
    compute = first._compute

    def compute_while_another_writes(users: list[str], *args: Any) -> Any:
        computed.append(list(users))
        if len(computed) == 1:  # between this batch's read and its write
            other.apply({"user-3": [_click("x", "user-3", 50)]}, items)
        return compute(users, *args)

    first._compute = compute_while_another_writes  # type: ignore[method-assign, assignment]
    first.apply({u: [_click(f"e{n}", u, n)] for n, u in enumerate(users)}, items)
    assert computed == [users, ["user-3"]]  # the other eleven slots committed the first time
    for user in users:
        events = int(_feature(cluster, keys.user_key(system, user), "events") or 0)
        assert events == (2 if user == "user-3" else 1), user


def test_a_stale_slot_map_is_followed_to_the_node_that_owns_the_slot(
    redis_cluster_nodes: RedisClusterProcesses, system: str, items: Mapping[str, ItemEmbeddings]
) -> None:
    """As after a resharding: the client believes a slot is on another node; the
    node answers MOVED and the call goes where the slot is."""
    client = StoreEndpoint(redis_cluster_nodes.url, StoreMode.CLUSTER).connect(
        socket_timeout=5, socket_connect_timeout=2
    )
    try:
        users = [f"user-{n}" for n in range(6)]
        slot = key_slot(keys.user_key(system, "user-0").encode())
        owner = client.get_node_from_key(keys.user_key(system, "user-0"))
        wrong = next(n for n in client.get_primaries() if n.name != owner.name)
        client.nodes_manager.slots_cache[slot] = [wrong]
        written = feature_store(client, system).apply(
            {u: [_click(f"e{n}", u, n)] for n, u in enumerate(users)}, items
        )
        assert set(written.updates) == set(users)
        for user in users:
            assert _feature(client, keys.user_key(system, user), "events") == b"1", user
        assert client.get_node_from_key(keys.user_key(system, "user-0")).name == owner.name
    finally:
        client.close()


def test_a_primary_that_dies_fails_the_batch_for_a_retry_that_succeeds_once_it_is_back(
    tmp_path: Path, system: str, items: Mapping[str, ItemEmbeddings]
) -> None:
    """A cluster of its own: one primary is killed, then restarted from its log."""
    nodes = redis_cluster(tmp_path, primaries=3).start()
    client = StoreEndpoint(nodes.url, StoreMode.CLUSTER).connect(
        socket_timeout=2, socket_connect_timeout=1
    )
    try:
        client.config_set("appendfsync", "always", target_nodes=RedisCluster.ALL_NODES)
        writer = feature_store(client, system)
        users = [f"user-{n}" for n in range(20)]
        writer.apply({u: [_click("e1", u, 1)] for u in users}, items)
        victim = f"127.0.0.1:{nodes.nodes[1].port}"
        assert any(client.get_node_from_key(keys.user_key(system, u)).name == victim for u in users)
        nodes.nodes[1].kill()
        second = {u: [_click("e2", u, 2)] for u in users}
        with pytest.raises(STORE_ERRORS):  # the job backs off and retries the batch
            writer.apply(second, items)
        nodes.nodes[1].start()
        nodes.join()
        writer.apply(second, items)
        for user in users:  # the killed node's users kept their first event, and got the second
            assert _feature(client, keys.user_key(system, user), "events") == b"2", user
    finally:
        client.close()
        nodes.stop()


def test_the_scripts_are_loaded_again_after_the_cluster_forgot_them(
    cluster: RedisCluster, system: str, items: Mapping[str, ItemEmbeddings]
) -> None:
    writer = feature_store(cluster, system)
    writer.apply({"a": [_click("e1", "a", 1)]}, items)
    cluster.script_flush()  # every primary
    writer.apply({u: [_click("e2", u, 2)] for u in ("a", "b", "c", "d")}, items)
    assert _feature(cluster, keys.user_key(system, "a"), "events") == b"2"
    assert _feature(cluster, keys.user_key(system, "d"), "events") == b"1"


def test_the_job_checks_of_an_empty_store_and_persistence_work_on_the_cluster(
    cluster: RedisCluster, system: str, items: Mapping[str, ItemEmbeddings]
) -> None:
    assert store_is_empty(cluster, system)
    feature_store(cluster, system).apply({"someone": [_view("e1", "someone")]}, items)
    assert not store_is_empty(cluster, system)  # found on whichever node holds the user
    assert store_persistence(cluster) is True  # the fixture's nodes append to a log


@pytest.mark.broker
def test_the_feature_job_configured_for_a_cluster_keeps_it_equal_to_the_reference(
    redis_cluster_nodes: RedisClusterProcesses,
    cluster: RedisCluster,
    job_settings: FeatureJobSettings,
    pulsar_url: str,
    topic: str,
    embeddings_root: Path,
) -> None:
    """From the settings (`redis_mode: cluster`, one node's URL) to every user's keys."""
    settings = job_settings.model_copy(
        update={"redis_url": redis_cluster_nodes.url, "redis_mode": StoreMode.CLUSTER}
    )
    events = interleave_users(known_stream(users=8, per_user=10, seed=13))
    produce_events(pulsar_url, topic, events)
    expected = reference(settings.system_id, events, embeddings_root)
    with running_job(settings) as job:
        assert isinstance(job.store.client, RedisCluster)
        wait_until(
            lambda: content(cluster, settings.system_id, events).same_as(expected),
            30,
            "the cluster to hold the reference",
        )


def _click(event_id: str, user: str, n: int) -> Event:
    return Event(event_id=event_id, user_id=user, item_id="i1", type="click", ts=BASE_TS + n)


def _view(event_id: str, user: str) -> Event:
    return Event(event_id=event_id, user_id=user, item_id="i2", type="view", ts=BASE_TS)


def _feature(client: Any, key: str, name: str) -> bytes | None:
    """One feature of a user's hash, as bytes (None: no such feature)."""
    value = keys.decode_features(client.hget(key, "features")).get(name)
    return None if value is None else value.encode()


def test_a_new_model_version_deletes_the_old_embeddings_on_either_topology(
    any_store: Any, system: str
) -> None:
    """The job moves from model version a to b: each user's next write (a slot group's
    script on the cluster) deletes `emb:a`, and only stale versions."""
    items_a = {"a": ItemEmbeddings.from_arrays("a", ["i1", "i2"], np.eye(2))}
    items_b = {"b": ItemEmbeddings.from_arrays("b", ["i1", "i2"], 2 * np.eye(2))}
    users = [f"user-{n}" for n in range(40)]  # many slots
    feature_store(any_store, system).apply(
        {u: [_click(f"e{n}", u, n)] for n, u in enumerate(users)}, items_a
    )
    assert all(any_store.hexists(keys.user_key(system, u), "emb:a") for u in users)
    feature_store(any_store, system).apply(
        {u: [_click(f"f{n}", u, 100 + n)] for n, u in enumerate(users)}, items_b
    )
    for user in users:
        names = set(any_store.hkeys(keys.user_key(system, user)))
        assert {n for n in names if n.startswith(b"emb:")} == {b"emb:b"}, user
        assert b"state" in names and b"recent" in names


def test_a_user_whose_state_cannot_be_read_is_left_as_it_is_on_either_topology(
    any_store: Any, system: str, items: Mapping[str, ItemEmbeddings], embeddings_root: Path
) -> None:
    """A `state` no form of which this job reads: that user's events are UNREADABLE_STATE
    (the job dead-letters them), nothing of theirs is written (hash, popular), and the
    batch's other users are written as without them."""
    events = stream(users=6, per_user=5, seed=23)
    stuck = "user-2"
    key = keys.user_key(system, stuck)
    any_store.hset(key, "state", b"\x00\x04\xc1")  # the binary form's magic, then no msgpack
    written = feature_store(any_store, system).apply(batches(events, len(events))[0], items)
    update = written.updates[stuck]
    assert set(update.outcomes) == {Outcome.UNREADABLE_STATE}
    assert update.problem is not None and stuck in update.problem
    assert any_store.hgetall(key) == {b"state": b"\x00\x04\xc1"}
    others = [e for e in events if e.user_id != stuck]
    expected = reference(system, others, embeddings_root)
    assert content(any_store, system, others).same_as(expected)  # popular: only theirs


def test_a_user_whose_key_holds_no_hash_is_left_as_it_is_on_either_topology(
    any_store: Any, system: str, items: Mapping[str, ItemEmbeddings], embeddings_root: Path
) -> None:
    """Another writer's string at a user's key: the read's WRONGTYPE makes that user's
    events UNREADABLE_STATE (dead-lettered by the job), not the batch an error (which
    ended the job's loop at every batch holding that user)."""
    events = stream(users=6, per_user=5, seed=37)
    stuck = "user-4"
    key = keys.user_key(system, stuck)
    any_store.set(key, b"not a hash")
    written = feature_store(any_store, system).apply(batches(events, len(events))[0], items)
    update = written.updates[stuck]
    assert set(update.outcomes) == {Outcome.UNREADABLE_STATE}
    assert update.problem is not None and stuck in update.problem and "hash" in update.problem
    assert any_store.get(key) == b"not a hash"
    others = [e for e in events if e.user_id != stuck]
    assert content(any_store, system, others).same_as(reference(system, others, embeddings_root))
