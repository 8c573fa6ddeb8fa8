"""The per-session answer cache: reused while the user's state is unchanged, recomputed
after the stream job applies a new event (whose item is then excluded), keyed by every
field of the request, bounded in entries and age; through the handler, its counters."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

from model_handlers.handler_settings import ENVIRONMENT_VARIABLES
from model_handlers.online_features import OnlineFeatures, RedisFeatureReader
from model_handlers.recommendation_cache import (
    CachedRetriever,
    RecommendationCache,
)
from model_handlers.retriever import Recommendation, RetrievalBatch, Retriever, Source
from model_handlers.torchserve_handler import RetrievalHandler
from recsys_contracts import handler_metrics
from recsys_contracts.events import Event
from recsys_contracts.feature_keys import LAYOUT_VERSION, user_key
from recsys_contracts.retrieval_request import RetrievalRequest
from recsys_operator.launchers.process import ManagedProcess, free_port
from stream_jobs.feature_store import FeatureStore, StoreLayout
from stream_jobs.user_features import FeatureParams

from .reference import BruteForce
from .test_handler_adapter import Context, Metrics

SYSTEM = "test-ns.cache"
BASE_TS = 1_780_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def answer(name: str) -> Recommendation:
    return Recommendation([name], [1.0], "1", Source.USER_TOWER)


def request(user: str | None = "u1", k: int = 5, **fields: tuple[str, ...]) -> RetrievalRequest:
    return RetrievalRequest(user, fields.get("recent", ()), k, fields.get("exclude", ()))


# --- the cache alone ---------------------------------------------------------------


def test_the_least_recently_used_entry_goes_first_past_the_bound() -> None:
    cache = RecommendationCache(max_entries=2, ttl_s=60, clock=Clock())
    a, b, c = ((request(user), ("1", "10")) for user in ("a", "b", "c"))
    cache.put(a, answer("a"))
    cache.put(b, answer("b"))
    assert cache.get(a) == answer("a")  # a is now more recent than b
    cache.put(c, answer("c"))
    assert len(cache) == 2
    assert cache.get(b) is None and cache.get(a) == answer("a") and cache.get(c) == answer("c")


def test_an_entry_expires_after_its_ttl() -> None:
    clock = Clock()
    cache = RecommendationCache(max_entries=10, ttl_s=30, clock=clock)
    key = (request(), ("1", "10"))
    cache.put(key, answer("x"))
    clock.now = 29.9
    assert cache.get(key) == answer("x")
    clock.now = 30.0
    assert cache.get(key) is None and len(cache) == 0


# --- with a real retriever and the feature store the stream job writes ---------------


@pytest.fixture
def store(redis_server: ManagedProcess) -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    yield client
    for key in client.scan_iter(f"recsys:{LAYOUT_VERSION}:{SYSTEM}:*"):
        client.delete(key)
    client.close()


@pytest.fixture(scope="module")
def retriever(unpacked: dict[str, Path]) -> Retriever:
    return Retriever.load(unpacked["1"], use_gpu=False)


class Counting(Retriever):
    """The real retriever, counting the requests it computes."""

    def __init__(self, inner: Retriever) -> None:
        self.__dict__.update(inner.__dict__)
        self.computed = 0

    def recommend(
        self,
        requests: Sequence[RetrievalRequest],
        online: Sequence[OnlineFeatures] | None = None,
    ) -> RetrievalBatch:
        self.computed += len(requests)
        return super().recommend(requests, online)


def click(store: redis.Redis, user: str, item: str, n: int) -> None:
    """One click applied by the stream job's own store writer."""
    writer = FeatureStore(store, StoreLayout(SYSTEM, 600_000, 86_400_000), FeatureParams())
    event = Event(event_id=f"e{n}", user_id=user, item_id=item, type="click", ts=BASE_TS + n)
    writer.apply({user: [event]}, {})


def test_an_answer_is_reused_until_a_new_event_changes_the_users_state(
    store: redis.Redis, retriever: Retriever, brute_force: dict[str, BruteForce]
) -> None:
    reference = brute_force["1"]
    user = sorted(reference.users)[0]
    first_item = reference.answer(user, k=5)[0]
    click(store, user, "some-item-the-model-does-not-know", 1)
    reader = RedisFeatureReader(
        store,
        system=SYSTEM,
        model_version="1",
        dim=retriever.dim,
        history_length=retriever.history_length,
    )
    counting = Counting(retriever)
    cached = CachedRetriever(counting, RecommendationCache(100, 60))

    def ask() -> tuple[list[str], int]:
        batch = cached.recommend([request(user, k=5)], reader.read([user]).features)
        return batch.recommendations[0].item_ids, batch.hits

    before, hits = ask()
    assert hits == 0 and counting.computed == 1
    again, hits = ask()
    assert again == before and hits == 1 and counting.computed == 1  # unchanged state: reused

    click(store, user, first_item, 2)  # the user clicks the top recommendation
    after, hits = ask()
    assert hits == 0 and counting.computed == 2  # new state version: computed afresh
    assert first_item not in after
    expected = reference.top_k(reference.query(user, [first_item]), 5, [first_item])[0]
    assert after == expected


def test_every_field_of_the_request_is_part_of_the_key(retriever: Retriever) -> None:
    counting = Counting(retriever)
    cached = CachedRetriever(counting, RecommendationCache(100, 60))
    items = retriever.item_ids
    base = request("u1", k=5)
    variants = [
        base,
        request("u1", k=6),
        request("u1", k=5, exclude=(items[0],)),
        request("u1", k=5, recent=(items[1],)),
        request("u2", k=5),
    ]
    first = cached.recommend(variants)
    assert first.hits == 0 and first.misses == len(variants)
    second = cached.recommend(variants)
    assert second.hits == len(variants) and counting.computed == len(variants)
    assert [r.item_ids for r in second.recommendations] == [
        r.item_ids for r in first.recommendations
    ]
    assert len(first.recommendations[1].item_ids) == 6
    assert items[0] not in first.recommendations[2].item_ids
    assert items[1] not in first.recommendations[3].item_ids


def test_requests_without_a_user_and_failed_store_reads_are_not_cached(
    retriever: Retriever,
) -> None:
    counting = Counting(retriever)
    cache = RecommendationCache(100, 60)
    cached = CachedRetriever(counting, cache)
    anonymous = request(None, k=3, recent=(retriever.item_ids[0],))
    for _ in range(2):
        assert cached.recommend([anonymous]).hits == 0
        assert cached.recommend([request("u1")], cacheable=False).hits == 0
    assert counting.computed == 4 and len(cache) == 0


def test_a_user_the_store_holds_no_state_version_for_is_not_cached(
    store: redis.Redis, retriever: Retriever
) -> None:
    """A hash written without the version fields (not by the stream job) carries no version."""
    user = "u-without-state"
    store.hset(user_key(SYSTEM, user), "recent", retriever.item_ids[3])
    reader = RedisFeatureReader(
        store, system=SYSTEM, model_version="1", dim=retriever.dim,
        history_length=retriever.history_length,
    )  # fmt: skip
    cache = RecommendationCache(100, 60)
    cached = CachedRetriever(retriever, cache)
    for _ in range(2):
        features = reader.read([user]).features
        assert features[0].state_version is None and features[0].recent_item_ids
        assert cached.recommend([request(user)], features).hits == 0
    assert len(cache) == 0


# --- through the TorchServe adapter ------------------------------------------------------


def test_the_handler_counts_hits_and_misses_and_answers_the_same(
    unpacked: dict[str, Path],
    brute_force: dict[str, BruteForce],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RECSYS_CACHE_MAX_ENTRIES", "1")
    metrics = Metrics()
    handler = RetrievalHandler()
    handler.initialize(Context(unpacked["1"], metrics))
    a, b = sorted(brute_force["1"].users)[:2]
    bodies = [[{"body": {"user_id": user, "k": 4}}] for user in (a, a, b, a)]
    answers = [
        json.loads(handler.handle(body, Context(unpacked["1"], metrics))[0])["item_ids"]
        for body in bodies
    ]
    assert answers[0] == answers[1] == answers[3] == brute_force["1"].answer(a, k=4)
    assert answers[2] == brute_force["1"].answer(b, k=4)
    counted = {
        name: sum(v for n, v, _ in metrics.log if n == name)
        for name in (handler_metrics.CACHE_HITS.name, handler_metrics.CACHE_MISSES.name)
    }
    # a misses, a hits, b misses and evicts a (one entry), a misses again.
    assert counted == {handler_metrics.CACHE_HITS.name: 1, handler_metrics.CACHE_MISSES.name: 3}


def test_a_cache_of_zero_entries_is_off(
    unpacked: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RECSYS_CACHE_MAX_ENTRIES", "0")
    metrics = Metrics()
    handler = RetrievalHandler()
    handler.initialize(Context(unpacked["1"], metrics))
    for _ in range(2):
        handler.handle([{"body": {"user_id": "u1", "k": 2}}], Context(unpacked["1"], metrics))
    names = {name for name, _, _ in metrics.log}
    assert handler_metrics.CACHE_HITS.name not in names
    assert handler_metrics.CACHE_MISSES.name not in names


def test_a_store_that_is_down_bypasses_the_cache(
    unpacked: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RECSYS_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("RECSYS_SYSTEM_ID", SYSTEM)
    monkeypatch.setenv("RECSYS_STORE_TIMEOUT_MS", "20")
    metrics = Metrics()
    handler = RetrievalHandler()
    handler.initialize(Context(unpacked["1"], metrics))
    for _ in range(2):
        handler.handle([{"body": {"user_id": "u1", "k": 2}}], Context(unpacked["1"], metrics))
    names = {name for name, _, _ in metrics.log}
    assert handler_metrics.STORE_ERRORS.name in names
    assert handler_metrics.CACHE_HITS.name not in names
    assert handler.cached is not None and handler.cached.cache is not None
    assert len(handler.cached.cache) == 0
