"""Reading online features from a real Redis: one pipelined round trip per batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from model_handlers import online_features
from model_handlers.online_features import NO_FEATURES, RedisFeatureReader, connect
from recsys_contracts.events import Event
from recsys_contracts.feature_keys import (
    LAYOUT_VERSION,
    embedding_field,
    encode_embedding,
    encode_recent,
    seen_field,
    user_key,
)
from recsys_contracts.store_endpoint import StoreEndpoint, StoreMode
from recsys_operator.launchers.process import ManagedProcess, free_port
from recsys_operator.launchers.redis_server import RedisClusterProcesses
from stream_jobs.feature_store import FeatureStore, StoreLayout
from stream_jobs.item_embeddings import ItemEmbeddings
from stream_jobs.user_features import FeatureParams

pytestmark = pytest.mark.redis

SYSTEM = "test-ns.features"
BASE_TS = 1_767_225_600_000


class CountingClient:
    """A Redis client that counts round trips (pipeline executions and direct calls)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.round_trips = 0

    def pipeline(self, transaction: bool = True) -> Any:
        pipe = self.client.pipeline(transaction=transaction)
        execute = pipe.execute

        def counted() -> Any:
            self.round_trips += 1
            return execute()

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe


@pytest.fixture
def client(redis_server: ManagedProcess) -> Iterator[redis.Redis]:
    c = redis.Redis(host="127.0.0.1", port=redis_server.port)
    yield c
    for key in c.scan_iter(f"recsys:{LAYOUT_VERSION}:{SYSTEM}:*"):
        c.delete(key)
    c.close()


def test_a_batch_is_read_in_one_round_trip(client: redis.Redis) -> None:
    vector = np.arange(8, dtype=np.float32)
    client.hset(
        user_key(SYSTEM, "alice"),
        mapping={"recent": encode_recent(["i3", "i2", "i1"]), "emb:7": encode_embedding(vector)},
    )
    wrong_dimension = encode_embedding(np.ones(5))
    client.hset(user_key(SYSTEM, "bob"), mapping={"recent": "i9", "emb:7": wrong_dimension})
    counting = CountingClient(client)
    reader = RedisFeatureReader(counting, system=SYSTEM, model_version="7", dim=8, history_length=2)
    read = reader.read(["alice", None, "bob", "carol", "alice"])
    assert counting.round_trips == 1
    alice, nobody, bob, carol, alice_again = read.features
    assert alice.recent_item_ids == ("i3", "i2")  # newest first, history_length of them
    np.testing.assert_array_equal(alice.embedding, vector)
    assert bob.recent_item_ids == ("i9",) and bob.embedding is None
    assert nobody is NO_FEATURES and carol.empty and alice_again == alice
    assert read.misses == 1 and read.error is None


def test_every_item_the_user_touched_is_read_with_the_recent_ones(client: redis.Redis) -> None:
    client.hset(user_key(SYSTEM, "heavy"), "recent", "i99")
    client.hset(user_key(SYSTEM, "heavy"), mapping={seen_field(f"i{n}"): "1" for n in range(100)})
    reader = RedisFeatureReader(client, system=SYSTEM, model_version="7", dim=8, history_length=2)
    (heavy,) = reader.read(["heavy"]).features
    assert heavy.recent_item_ids == ("i99",)
    assert heavy.seen_item_ids == {f"i{n}" for n in range(100)}


def test_another_model_version_reads_its_own_embedding(client: redis.Redis) -> None:
    client.hset(user_key(SYSTEM, "alice"), embedding_field("7"), encode_embedding(np.ones(4)))
    reader = RedisFeatureReader(client, system=SYSTEM, model_version="8", dim=4, history_length=5)
    assert reader.read(["alice"]).features[0].embedding is None


@pytest.mark.parametrize("mode", ["single", "cluster"])
def test_a_store_that_is_down_fails_no_request(mode: str) -> None:
    """Not at the model's start either: a cluster client is made at the first read."""
    closed = connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.05, mode=mode)
    reader = RedisFeatureReader(closed, system=SYSTEM, model_version="1", dim=4, history_length=5)
    for _ in range(2):  # and again on the next batch
        read = reader.read(["alice", "bob"])
        assert read.features == [NO_FEATURES, NO_FEATURES]
        assert read.error and read.misses == 2


def test_no_user_ids_means_no_round_trip(client: redis.Redis) -> None:
    counting = CountingClient(client)
    reader = RedisFeatureReader(counting, system=SYSTEM, model_version="1", dim=4, history_length=5)
    assert reader.read([None, None]).features == [NO_FEATURES, NO_FEATURES]
    assert counting.round_trips == 0


@pytest.fixture
def cluster_writer(redis_cluster_nodes: RedisClusterProcesses) -> Iterator[Any]:
    """The feature job's client of the loopback Redis Cluster (`store_endpoint`)."""
    endpoint = StoreEndpoint(redis_cluster_nodes.url, StoreMode.CLUSTER)
    c = endpoint.connect(socket_timeout=2, socket_connect_timeout=2)
    yield c
    for key in c.scan_iter(f"recsys:{LAYOUT_VERSION}:{SYSTEM}:*"):  # every primary
        c.delete(key)
    c.close()


def test_the_handler_reads_what_the_feature_job_wrote_to_a_redis_cluster(
    redis_cluster_nodes: RedisClusterProcesses, cluster_writer: Any, client: redis.Redis
) -> None:
    """Users spread over the three primaries are read in one call, as from one node."""
    catalog = {"7": ItemEmbeddings.from_arrays("7", ["i1", "i2", "i3"], np.eye(3))}
    users = [f"u{n}" for n in range(30)]
    batch = {
        user: [
            Event(
                event_id=f"e{k}",
                user_id=user,
                item_id=f"i{1 + (n + k) % 3}",
                type="click",
                ts=BASE_TS + k,
            )
            for k in range(n % 4 + 1)
        ]
        for n, user in enumerate(users)
    }
    nodes = {cluster_writer.get_node_from_key(user_key(SYSTEM, u)).name for u in users}
    assert len(nodes) == 3
    handler_client = connect(redis_cluster_nodes.url, timeout_s=2.0, mode="cluster")
    reads = []
    for writer, reader_client in ((cluster_writer, handler_client), (client, client)):
        layout = StoreLayout(SYSTEM, 60_000, 86_400_000)
        FeatureStore(writer, layout, FeatureParams()).apply(batch, catalog)
        reader = RedisFeatureReader(
            reader_client, system=SYSTEM, model_version="7", dim=3, history_length=2
        )
        reads.append(reader.read([*users, None, "nobody"]))
    handler_client.close()
    from_cluster, from_single = reads
    assert from_cluster.error is None and from_cluster.misses == 1
    for user, got, wanted in zip(users, from_cluster.features, from_single.features, strict=False):
        assert got.recent_item_ids == wanted.recent_item_ids and got.recent_item_ids, user
        assert got.seen_item_ids == {e.item_id for e in batch[user]}, user
        assert got.embedding is not None and wanted.embedding is not None
        assert np.array_equal(got.embedding, wanted.embedding), user


class RecordingClient(CountingClient):
    """Also keeps every reply a pipeline brought back."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.replies: list[Any] = []

    def pipeline(self, transaction: bool = True) -> Any:
        pipe = super().pipeline(transaction)
        execute = pipe.execute

        def recorded() -> Any:
            replies = execute()
            self.replies.append(replies)
            return replies

        pipe.execute = recorded  # type: ignore[method-assign]
        return pipe


def test_the_reader_takes_only_its_fields_not_the_state_or_old_embeddings(
    client: redis.Redis,
) -> None:
    """After the job moved from model version a to b, the reader for b gets its
    embedding, recent and seen items and state version in one round trip, and neither
    the job's `state` nor another version's embedding crosses the network."""
    items = {
        v: ItemEmbeddings.from_arrays(v, ["i1", "i2", "i3"], scale * np.eye(3))
        for v, scale in (("a", 1.0), ("b", 2.0))
    }
    writer = FeatureStore(client, StoreLayout(SYSTEM, 60_000, 86_400_000), FeatureParams())
    events = [
        Event(event_id=f"e{k}", user_id="u", item_id=f"i{1 + k % 3}", type="click", ts=BASE_TS + k)
        for k in range(4)
    ]
    writer.apply({"u": events[:2]}, {"a": items["a"]})
    client.hset(user_key(SYSTEM, "u"), embedding_field("old"), encode_embedding(np.ones(3)))
    writer.apply({"u": events[2:]}, {"a": items["a"], "b": items["b"]})
    recording = RecordingClient(client)
    reader = RedisFeatureReader(
        recording, system=SYSTEM, model_version="b", dim=3, history_length=5
    )
    (user,) = reader.read(["u"]).features
    assert recording.round_trips == 1
    stored: dict[bytes, bytes] = client.hgetall(user_key(SYSTEM, "u"))  # type: ignore[assignment]
    np.testing.assert_array_equal(user.embedding, np.frombuffer(stored[b"emb:b"], dtype="<f4"))
    assert user.recent_item_ids == ("i1", "i3", "i2", "i1")
    assert user.seen_item_ids == {"i1", "i2", "i3"}
    assert user.state_version == ("4", str(BASE_TS + 3))
    received = repr(recording.replies)
    for unwanted in (b"state", b"emb:a", b"emb:old"):
        assert repr(stored[unwanted]) not in received, unwanted


def test_a_user_with_more_fields_than_one_scan_takes_is_read_whole(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hash larger than the HSCAN count is scanned on until its end."""
    monkeypatch.setattr(online_features, "SEEN_SCAN_COUNT", 10)
    seen = {f"i{n}" for n in range(300)}
    client.hset(user_key(SYSTEM, "heavy"), mapping={seen_field(i): "1" for i in seen})
    reader = RedisFeatureReader(client, system=SYSTEM, model_version="7", dim=8, history_length=2)
    (heavy,) = reader.read(["heavy", "nobody"]).features[:1]
    assert heavy.seen_item_ids == seen
