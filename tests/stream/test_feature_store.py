"""The Redis side of a batch: one optimistic transaction, against a real redis-server."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from stream_support import BASE_TS, store_content

from recsys_contracts import feature_keys as keys
from recsys_contracts.events import Event
from stream_jobs.feature_store import WRITE_BATCH, FeatureStore, StoreLayout
from stream_jobs.features import store_persistence
from stream_jobs.item_embeddings import ItemEmbeddings
from stream_jobs.user_features import FeatureParams, decode_state, view

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
    assert store.lrange(keys.recent_items_key(system, "u"), 0, -1) == [b"i2", b"i1"]
    assert store.hget(keys.features_key(system, "w"), "count:click:1h") == b"1"
    vector = keys.decode_embedding(store.get(keys.embedding_key(system, "u", "v1")) or b"", 2)
    assert vector is not None and np.allclose(vector, [0.098, 0.1])
    assert view(decode_state(store.get(keys.state_key(system, "u"))), PARAMS).events_applied == 2
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
    assert store.llen(keys.recent_items_key(system, "heavy")) == last_n
    seen = store.smembers(keys.seen_items_key(system, "heavy"))
    assert seen == {f"i{n}".encode() for n in range(last_n + 5)}
    assert store.pttl(keys.seen_items_key(system, "heavy")) > 0


def test_a_batch_of_only_duplicates_writes_nothing(store: redis.Redis, system: str) -> None:
    fs = feature_store(store, system)
    fs.apply({"u": [click(1)]}, ITEMS)
    store.pexpire(keys.state_key(system, "u"), 5_000)
    fs.apply({"u": [click(1)]}, ITEMS)
    assert store.pttl(keys.state_key(system, "u")) <= 5_000  # not even the TTL was touched


def test_the_script_is_loaded_again_after_the_server_forgot_it(
    store: redis.Redis, system: str
) -> None:
    fs = feature_store(store, system)
    fs.apply({"u": [click(1)]}, ITEMS)
    store.script_flush()
    fs.apply({"u": [click(2)]}, ITEMS)
    assert store.hget(keys.features_key(system, "u"), "events") == b"2"


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
    state = view(decode_state(store.get(keys.state_key(system, "u"))), PARAMS)
    assert set(state.seen) == {"e1", "e7"} and state.events_applied == 2


def test_writes_of_only_what_changed_leave_what_whole_writes_leave(
    store: redis.Redis, system: str
) -> None:
    """A store sends only the changed fields and the new recent items of a user whose
    state is still the one it wrote; the keys then hold what a store that rewrites
    every key leaves, through new items, items falling off the last N, an event within
    the lateness going in between, impressions, and another writer in between."""
    remembering, other = feature_store(store, system), feature_store(store, system)
    whole = f"{system}-whole"
    sent: list[object] = []
    run = remembering._run

    def spy(script: str, calls: list) -> list:  # type: ignore[type-arg]
        if script == WRITE_BATCH:
            sent.extend(calls)
        return run(script, calls)

    remembering._run = spy  # type: ignore[method-assign]
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
    ]
    for writer, events in steps:
        writer.apply({"u": events}, ITEMS)
        feature_store(store, whole).apply({"u": events}, ITEMS)  # remembers nothing
        mine, reference = (
            store_content(store, s, ["u"], ["v1"]).users["u"] for s in (system, whole)
        )
        assert mine == reference, events
    assert store.llen(keys.recent_items_key(system, "u")) == PARAMS.last_n
    partial = [c for c in sent if b'"keep":-1' not in c.args[1]]  # type: ignore[attr-defined]
    assert len(partial) >= 5  # the partial writes were taken, not only whole ones


def test_ids_with_quotes_backslashes_and_non_ascii_characters_survive(
    store: redis.Redis, system: str
) -> None:
    user, item = 'ü"ser\\1', 'ítem-"ä\\'
    feature_store(store, system).apply({user: [click(1, user, item)]}, ITEMS)
    assert store.lrange(keys.recent_items_key(system, user), 0, -1) == [item.encode()]
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
