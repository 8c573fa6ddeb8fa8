"""The Redis side of a batch: one optimistic transaction, against a real redis-server."""

from __future__ import annotations

import time
from typing import Any

import hiredis
import numpy as np
import pytest
import redis
from stream_support import BASE_TS, store_content

from recsys_contracts import feature_keys as keys
from recsys_contracts.events import Event
from stream_jobs import feature_store as feature_store_module
from stream_jobs.feature_store import FeatureStore, StoreLayout
from stream_jobs.features import store_persistence
from stream_jobs.item_embeddings import ItemEmbeddings
from stream_jobs.user_features import (
    FeatureParams,
    UserState,
    decode_state,
    encode_state,
    update_user,
    view,
)

pytestmark = pytest.mark.redis

PARAMS = FeatureParams()
ITEMS = {"v1": ItemEmbeddings.from_arrays("v1", ["i1", "i2"], np.eye(2))}


def click(n: int, user: str = "u", item: str = "i1") -> Event:
    return Event(event_id=f"e{n}", user_id=user, item_id=item, type="click", ts=BASE_TS + n)


def feature_store(client: redis.Redis, system: str) -> FeatureStore:
    return FeatureStore(client, StoreLayout(system, 60_000, 7 * 86_400_000), PARAMS)


def test_a_batch_writes_every_key_of_its_users(store: redis.Redis, system: str) -> None:
    written = feature_store(store, system).apply(
        {"u": [click(1), click(2, item="i2")], "w": [click(3, "w")]}, ITEMS
    )
    assert set(written.updates) == {"u", "w"}
    user = keys.user_key(system, "u")
    assert keys.decode_recent(store.hget(user, "recent")) == ["i2", "i1"]
    assert _feature(store, keys.user_key(system, "w"), "count:click:1h") == b"1"
    vector = keys.decode_embedding(store.hget(user, "emb:v1") or b"", 2)
    assert vector is not None and np.allclose(vector, [0.098, 0.1])
    assert view(decode_state(store.hget(user, "state")), PARAMS).events_applied == 2
    assert 0 < store.pttl(user) <= 60_000
    assert {m for m, _ in store.zrange(keys.popular_items_key(system), 0, -1, withscores=True)} == {
        b"i1",
        b"i2",
    }
    assert 0 < store.pttl(keys.popular_items_key(system)) <= 60_000


def test_every_item_a_user_touched_stays_seen_beyond_the_last_n(
    store: redis.Redis, system: str
) -> None:
    """Serving excludes a heavy user's whole history, not only the recent list."""
    writer = feature_store(store, system)
    last_n = writer.params.last_n
    for n in range(last_n + 5):
        writer.apply({"heavy": [click(10 + n, item=f"i{n}")]}, ITEMS)
    fields = store.hgetall(keys.user_key(system, "heavy"))
    assert len(keys.decode_recent(fields[b"recent"])) == last_n
    assert keys.seen_items(fields) == {f"i{n}" for n in range(last_n + 5)}
    assert store.pttl(keys.user_key(system, "heavy")) > 0


def test_a_batch_of_only_duplicates_writes_nothing(store: redis.Redis, system: str) -> None:
    fs = feature_store(store, system)
    fs.apply({"u": [click(1)]}, ITEMS)
    store.pexpire(keys.user_key(system, "u"), 5_000)
    fs.apply({"u": [click(1)]}, ITEMS)
    assert store.pttl(keys.user_key(system, "u")) <= 5_000  # not even the TTL was touched
    fs.apply({"u": [click(2)]}, ITEMS)  # the WATCH of the batch that wrote nothing is gone
    assert _feature(store, keys.user_key(system, "u"), "events") == b"2"


def test_a_concurrent_writer_makes_the_batch_retry_instead_of_losing_its_update(
    store: redis.Redis, system: str
) -> None:
    first, other = feature_store(store, system), feature_store(store, system)
    compute = first._compute
    interfered = []

    def compute_while_another_writes(*args: object, **kwargs: object) -> object:
        if not interfered:  # between this batch's read and its write, another consumer writes
            interfered.append(other.apply({"u": [click(7)]}, ITEMS))
        return compute(*args, **kwargs)  # type: ignore[arg-type]

    first._compute = compute_while_another_writes  # type: ignore[method-assign]
    first.apply({"u": [click(1)]}, ITEMS)
    state = view(decode_state(store.hget(keys.user_key(system, "u"), "state")), PARAMS)
    assert set(state.seen) == {"e1", "e7"} and state.events_applied == 2


@pytest.mark.parametrize("protocol", [2, 3])
def test_the_store_reads_either_protocols_replies(
    store_url: str, system: str, protocol: int
) -> None:
    """The store parses replies itself: RESP2 and RESP3 (redis-py's default) alike,
    through a lost race (EXEC's null) and a read of a v1 user's seen set (a set)."""
    client = redis.Redis.from_url(store_url, protocol=protocol)
    try:
        client.sadd(keys.v1_seen_items_key(system, "v"), "i9")
        client.zadd(keys.popular_items_key(system, "v1"), {"i9": 1.0})
        first, other = feature_store(client, system), feature_store(client, system)
        compute = first._compute

        def compute_while_another_writes(*args: object) -> object:
            if not other._written:
                other.apply({"u": [click(7)]}, ITEMS)
            return compute(*args)  # type: ignore[arg-type]

        first._compute = compute_while_another_writes  # type: ignore[method-assign]
        state = encode_state(
            update_user(UserState(), {"v1": None}, [click(1, "v")], PARAMS, ITEMS).state
        )
        client.set(keys.v1_state_key(system, "v"), state)
        first.apply({"u": [click(1)], "v": [click(2, "v", "i2")]}, ITEMS)
        assert _feature(client, keys.user_key(system, "u"), "events") == b"2"
        fields = client.hgetall(keys.user_key(system, "v"))
        features = keys.decode_features(fields[b"features"])
        assert features["events"] == "2" and keys.seen_items(fields) == {"i2", "i9"}
    finally:
        client.close()


def test_a_concurrent_writer_makes_only_its_transaction_retry(
    store: redis.Redis, system: str
) -> None:
    """A batch goes in transactions of TRANSACTION_USERS users: another consumer writing
    one user makes that user's transaction alone read and compute again."""
    first, other = feature_store(store, system), feature_store(store, system)
    size = feature_store_module.TRANSACTION_USERS
    users = [f"user-{n}" for n in range(size + 5)]  # two transactions
    computed: list[list[str]] = []
    compute = first._compute

    def compute_while_another_writes(batch_users: list[str], *args: Any) -> Any:
        computed.append(list(batch_users))
        if len(computed) == 1:  # between this batch's read and its write
            other.apply({users[-1]: [click(50, users[-1])]}, ITEMS)
        return compute(batch_users, *args)

    first._compute = compute_while_another_writes  # type: ignore[method-assign]
    first.apply({u: [click(n, u)] for n, u in enumerate(users)}, ITEMS)
    assert computed == [users, users[size:]]  # the first transaction committed at once
    for user in users:
        events = _feature(store, keys.user_key(system, user), "events")
        assert events == (b"2" if user == users[-1] else b"1"), user


def test_writes_of_only_what_changed_leave_what_whole_writes_leave(
    store: redis.Redis, system: str
) -> None:
    """A store sends `recent` only when it changed, and renews the TTL only when it has
    aged, for a user whose state is still the one it wrote; the hash then holds what a
    store that rewrites every field leaves, through new items, items falling off the
    last N, an event within the lateness going in between, impressions, and another
    writer in between."""
    remembering, other = feature_store(store, system), feature_store(store, system)
    whole = f"{system}-whole"
    sent: list[tuple[list[bytes], object, bool]] = []
    user_fields = remembering._user_fields

    def spy(*args: Any) -> Any:
        result = user_fields(*args)
        sent.append(result)
        return result

    remembering._user_fields = spy  # type: ignore[method-assign]
    impression = Event(event_id="imp", user_id="u", item_id="i2", type="impression", ts=BASE_TS + 9)
    steps: list[tuple[FeatureStore, list[Event]]] = [
        (remembering, [click(1), click(2, item="i2")]),
        (remembering, [impression, click(10, item="i3")]),
        (remembering, [click(5, item="i4")]),  # before the newest: goes in between
        (remembering, [click(20 + n, item=f"i{n}") for n in range(30)]),
        (remembering, [click(60 + n, item=f"j{n}") for n in range(30)]),  # past last_n
        (other, [click(100, item="k1")]),  # another writer: the next write is whole
        (remembering, [click(101, item="k2"), click(102, item="k3")]),
        (remembering, [click(103, item="k3")]),
        (
            remembering,
            [
                Event(
                    event_id="imp2", user_id="u", item_id="k1", type="impression", ts=BASE_TS + 104
                )
            ],
        ),
    ]
    for writer, events in steps:
        writer.apply({"u": events}, ITEMS)
        feature_store(store, whole).apply({"u": events}, ITEMS)  # remembers nothing
        mine, reference = (
            store_content(store, s, ["u"], ["v1"]).users["u"] for s in (system, whole)
        )
        assert mine == reference, events
    assert len(keys.decode_recent(store.hget(keys.user_key(system, "u"), "recent"))) == (
        PARAMS.last_n
    )
    no_renewal = [fields for fields, _, renew in sent if not renew]
    assert len(no_renewal) >= 5  # the partial writes were taken, not only whole ones
    assert any(b"recent" not in fields[::2] for fields, _, _ in sent)


def test_a_job_killed_before_exec_leaves_nothing_and_its_retry_counts_popular_once(
    store: redis.Redis, system: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transaction goes out without its EXEC and the connection dies: Redis drops
    what was queued. The retried batch then leaves what an uninterrupted run leaves,
    popular counted once, also when another consumer gets the batch again."""
    batch = {u: [click(n, u, f"i{1 + n % 2}"), click(n + 9, u, "i2")] for n, u in enumerate("abc")}
    uninterrupted = f"{system}-ref"
    feature_store(store, uninterrupted).apply(batch, ITEMS)
    exchange = feature_store_module._exchange

    def die_before_exec(connections: list[Any], commands: list[list[tuple[bytes, ...]]]) -> Any:
        if commands[0][-1] == (b"EXEC",):
            for reader, batch in zip(connections, commands, strict=True):
                packed = b"".join(hiredis.pack_command(c) for c in batch[:-1])
                reader.connection.send_packed_command([packed])
            raise redis.ConnectionError("the job died here")
        return exchange(connections, commands)

    crashing = feature_store(store, system)
    monkeypatch.setattr(feature_store_module, "_exchange", die_before_exec)
    with pytest.raises(redis.ConnectionError):
        crashing.apply(batch, ITEMS)
    monkeypatch.setattr(feature_store_module, "_exchange", exchange)
    assert not store.exists(keys.popular_items_key(system))
    assert not any(store.exists(keys.user_key(system, u)) for u in batch)
    crashing.apply(batch, ITEMS)  # the job retries the batch
    feature_store(store, system).apply(batch, ITEMS)  # and another consumer gets it again
    assert store_content(store, system, batch, ["v1"]) == store_content(
        store, uninterrupted, batch, ["v1"]
    )


def test_a_write_renews_the_ttl_unless_this_process_renewed_it_a_moment_ago(
    store: redis.Redis, system: str
) -> None:
    """Steady writes skip the PEXPIRE while the TTL is still within 1/64 of whole: a
    user's hash expires between 63/64 of the TTL and the TTL after their last event."""
    ttl_ms = 6_400  # renewed when 100 ms old
    writer = FeatureStore(store, StoreLayout(system, ttl_ms, 7 * 86_400_000), PARAMS)
    user = keys.user_key(system, "u")
    writer.apply({"u": [click(1)]}, ITEMS)
    store.pexpire(user, 5_000)  # as if time had passed, within the 100 ms
    writer.apply({"u": [click(2)]}, ITEMS)
    assert store.pttl(user) <= 5_000  # not renewed
    time.sleep(0.15)
    writer.apply({"u": [click(3)]}, ITEMS)
    assert ttl_ms - 1_000 < store.pttl(user) <= ttl_ms  # renewed
    store.pexpire(user, 5_000)
    feature_store(store, system).apply({"u": [click(4)]}, ITEMS)  # another writer...
    writer.apply({"u": [click(5)]}, ITEMS)  # ...so this one does not know the TTL: renews
    assert store.pttl(user) > 5_000
    assert _feature(store, user, "events") == b"5"


def test_ids_with_quotes_backslashes_and_non_ascii_characters_survive(
    store: redis.Redis, system: str
) -> None:
    user, item = 'ü"ser\\1', 'ítem-"ä\\'
    feature_store(store, system).apply({user: [click(1, user, item)]}, ITEMS)
    assert keys.decode_recent(store.hget(keys.user_key(system, user), "recent")) == [item]
    assert store.zscore(keys.popular_items_key(system), item) is not None


def test_the_job_tells_whether_the_store_keeps_its_writes(store: redis.Redis) -> None:
    """A Redis that persists nothing loses every user's state when it restarts."""
    original = {k: store.config_get(k)[k] for k in ("appendonly", "save")}
    try:
        store.config_set("appendonly", "no")
        store.config_set("save", "")
        assert store_persistence(store) is False
        store.config_set("save", "900 1")
        assert store_persistence(store) is True
        store.config_set("save", "")
        store.config_set("appendonly", "yes")
        assert store_persistence(store) is True
    finally:
        store.config_set("appendonly", original["appendonly"])
        store.config_set("save", original["save"])
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    assert store_persistence(down) is None


def _feature(client: Any, key: str, name: str) -> bytes | None:
    """One feature of a user's hash, as bytes (None: no such feature)."""
    value = keys.decode_features(client.hget(key, "features")).get(name)
    return None if value is None else value.encode()


def test_a_batch_of_10000_users_is_written_on_a_bounded_number_of_connections(
    store_url: str, system: str
) -> None:
    """The CRD allows batches of 10,000 users (313 transactions); the client's pool holds
    100 connections by default, shared with the job's other commands. The store keeps
    at most TRANSACTION_CONNECTIONS of them and sends its transactions in waves."""
    client = redis.Redis.from_url(store_url)  # the default pool, as the job opens it
    try:
        writer = feature_store(client, system)
        users = [f"user-{n}" for n in range(10_000)]
        writer.apply({u: [click(n, u, f"i{1 + n % 2}")] for n, u in enumerate(users)}, ITEMS)
        cap = feature_store_module.TRANSACTION_CONNECTIONS
        assert len(client.connection_pool._in_use_connections) <= cap
        assert client.ping()  # the job's own commands still get a connection
        for n in [*range(0, 10_000, 997), 9_999]:
            user = keys.user_key(system, users[n])
            assert _feature(client, user, "events") == b"1", n
            assert keys.decode_recent(client.hget(user, "recent")) == [f"i{1 + n % 2}"]
        assert client.zcard(keys.popular_items_key(system)) == 2
        writer.apply({users[5]: [click(10_005, users[5])]}, ITEMS)  # and the next batch
        assert _feature(client, keys.user_key(system, users[5]), "events") == b"2"
    finally:
        client.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_reply_the_store_cannot_parse_drops_the_connection_for_a_retry(
    store_url: str, system: str, protocol: int
) -> None:
    """Garbage on a transaction connection (out of step) is a ConnectionError, which the
    job retries (STORE_ERRORS), not a crash; the connections go back to the pool closed,
    and the retry writes the batch."""
    client = redis.Redis.from_url(store_url, protocol=protocol)
    try:
        writer = feature_store(client, system)
        writer.apply({"u": [click(1)]}, ITEMS)
        (reader,) = writer._connections
        reader._reader.feed(b"?not a reply\r\n")  # as if the server had sent it
        with pytest.raises(redis.ConnectionError):
            writer.apply({"u": [click(2)]}, ITEMS)
        assert writer._connections == [] and not client.connection_pool._in_use_connections
        writer.apply({"u": [click(2)]}, ITEMS)
        assert _feature(client, keys.user_key(system, "u"), "events") == b"2"
    finally:
        client.close()


def test_a_new_model_version_deletes_the_old_versions_embedding(
    store: redis.Redis, system: str
) -> None:
    """The job moves from model version a to b: a user's next write deletes `emb:a`,
    also when written by a restarted job (which remembers nothing)."""
    items_a = {"a": ItemEmbeddings.from_arrays("a", ["i1", "i2"], np.eye(2))}
    items_ab = {**items_a, "b": ItemEmbeddings.from_arrays("b", ["i1", "i2"], 2 * np.eye(2))}
    items_b = {"b": items_ab["b"]}
    feature_store(store, system).apply({"u": [click(1)], "w": [click(2, "w")]}, items_a)
    user, other = keys.user_key(system, "u"), keys.user_key(system, "w")
    assert store.hexists(user, "emb:a")
    feature_store(store, system).apply({"u": [click(3, item="i2")]}, items_ab)  # both served
    assert store.hexists(user, "emb:a") and store.hexists(user, "emb:b")
    restarted = feature_store(store, system)
    restarted.apply({"u": [click(4)], "w": [click(5, "w", "i2")]}, items_b)
    for name in (user, other):
        fields = store.hgetall(name)
        assert b"emb:a" not in fields and b"emb:b" in fields, name
    restarted.apply({"u": [click(6)]}, items_b)
    assert {k for k in store.hkeys(user) if k.startswith(b"emb:")} == {b"emb:b"}


def test_the_v1_popular_copy_and_its_record_are_read_at_one_instant(
    store_url: str, system: str
) -> None:
    """A v1 job that counts an event while the upgrade reads v1's popular and its record
    leaves the event in both reads or in neither: never honoured as counted by v1 (so
    not counted by v2) while missing from the copy."""
    v1_popular = keys.popular_items_key(system, "v1")
    v1_record = keys.popular_applied_key(system, "v1")
    late = feature_store_module._event_member("x", "late")
    now_ms = int(time.time() * 1000)
    client, v1_job = redis.Redis.from_url(store_url), redis.Redis.from_url(store_url)
    client.zadd(v1_popular, {"i1": 3.0})
    client.zadd(v1_record, {feature_store_module._event_member("x", "e0"): now_ms})
    interleaved: list[str] = []

    def after_a_read_of_v1(names: list[str]) -> None:
        if not interleaved and {"ZRANGE", "ZRANGEBYSCORE", "EVALSHA"} & set(names):
            interleaved.append(names[0])
            with v1_job.pipeline(transaction=True) as pipe:  # as a v1 job counts an event
                pipe.zincrby(v1_popular, 1.0, "late-item")
                pipe.zadd(v1_record, {late: now_ms})
                pipe.execute()

    execute_command, pipeline = client.execute_command, client.pipeline

    def command(*args: Any, **options: Any) -> Any:
        result = execute_command(*args, **options)
        after_a_read_of_v1([str(args[0]).upper()])
        return result

    def spied_pipeline(*args: Any, **options: Any) -> Any:
        pipe = pipeline(*args, **options)
        execute = pipe.execute

        def spied_execute(*a: Any, **k: Any) -> Any:
            names = [str(entry[0][0]).upper() for entry in pipe.command_stack]
            result = execute(*a, **k)
            after_a_read_of_v1(names)
            return result

        pipe.execute = spied_execute  # type: ignore[method-assign]
        return pipe

    client.execute_command = command  # type: ignore[method-assign]
    client.pipeline = spied_pipeline  # type: ignore[method-assign]
    try:
        writer = feature_store(client, system)
        writer.apply({"u": [click(1)]}, ITEMS)
        assert interleaved  # the v1 job did write during the upgrade's read
        copied = client.zscore(keys.popular_items_key(system), "late-item") is not None
        assert copied == (late in writer._counted_by_v1)
        assert client.zscore(keys.popular_items_key(system), "i1") is not None
        assert feature_store_module._event_member("x", "e0") in writer._counted_by_v1
    finally:
        client.close()
        v1_job.close()
