"""Recent answers per active session, so a user who asks again before anything about them
changed (the next page, a refreshed screen, a client that re-renders) gets the same answer
without the user tower or the index search.

An answer depends on the request (user, k, recent and excluded items), on the user's
online features and on the model; a worker serves one model version, so the key is the
request plus the user's **state version** (`events`, `last_ts` of the features hash,
read in the same pipeline as the features themselves). Every event the stream job
applies changes the version in the same atomic write that changes the recent and seen
items, so a new event is a new key: the next request recomputes, and items the user has
just seen are excluded as they would be without the cache. Without a feature store the
request alone decides the answer, and the version is None.

Not cached: requests without a user id (no session to speak of), users for whom the
store holds no state version (no `features` hash: a user with no applied event yet, or
keys written by something other than the stream job, which must bump `events` like the
job does), and whole batches whose feature-store read failed (their features, and so their answers, are a degraded guess that
must not outlive the outage). Entries are bounded in number (least recently used goes
first) and in age (`ttl_s`), which bounds both memory and how long an idle session holds
it: an entry is a list of up to k item ids (references into the model's id list) and scores.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from model_handlers.online_features import NO_FEATURES, OnlineFeatures
from model_handlers.retriever import Recommendation, Retriever
from recsys_contracts.retrieval_request import RetrievalRequest

CacheKey = tuple[RetrievalRequest, tuple[str, str] | None]
"""The request (every field of it) and the user's state version."""


class RecommendationCache:
    """A bounded LRU map from `CacheKey` to the answer, each entry living `ttl_s`."""

    def __init__(
        self, max_entries: int, ttl_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError(
                f"a cache needs max_entries >= 1 and ttl_s > 0, got {max_entries}, {ttl_s}"
            )
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[CacheKey, tuple[float, Recommendation]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> Recommendation | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, answer = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return answer

    def put(self, key: CacheKey, answer: Recommendation) -> None:
        self._entries[key] = (self._clock() + self.ttl_s, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


@dataclass(frozen=True)
class CachedBatch:
    recommendations: list[Recommendation]
    hits: int
    """Requests answered from the cache."""
    misses: int
    """Cacheable requests that were computed (and are now cached)."""
    search_ms: float | None
    """Search time of the computed requests; None when every request was a hit."""


class CachedRetriever:
    """`Retriever.recommend` with the cache in front: hits are answered as they were,
    the rest are computed in one batch and remembered."""

    def __init__(self, retriever: Retriever, cache: RecommendationCache | None) -> None:
        self.retriever = retriever
        self.cache = cache

    def recommend(
        self,
        requests: Sequence[RetrievalRequest],
        online: Sequence[OnlineFeatures] | None = None,
        *,
        cacheable: bool = True,
    ) -> CachedBatch:
        """Top-k items per request; `cacheable` False (a failed store read) bypasses the
        cache both ways."""
        features = list(online) if online is not None else [NO_FEATURES] * len(requests)
        # With a store, a user it holds no state version for is not cached: nothing
        # would tell a later change of their keys apart.
        keys: list[CacheKey | None] = [
            (r, f.state_version)
            if self.cache is not None
            and cacheable
            and r.user_id is not None
            and (online is None or f.state_version is not None)
            else None
            for r, f in zip(requests, features, strict=True)
        ]
        answers: list[Recommendation | None] = [
            self.cache.get(key) if self.cache is not None and key is not None else None
            for key in keys
        ]
        todo = [n for n, answer in enumerate(answers) if answer is None]
        search_ms = None
        if todo:
            batch = self.retriever.recommend(
                [requests[n] for n in todo], [features[n] for n in todo]
            )
            search_ms = batch.search_ms
            for n, answer in zip(todo, batch.recommendations, strict=True):
                answers[n] = answer
                key = keys[n]
                if self.cache is not None and key is not None:
                    self.cache.put(key, answer)
        cacheable_count = sum(key is not None for key in keys)
        misses = sum(keys[n] is not None for n in todo)
        recommendations = [a for a in answers if a is not None]
        assert len(recommendations) == len(requests)  # every request answered, in order
        return CachedBatch(
            recommendations=recommendations,
            hits=cacheable_count - misses,
            misses=misses,
            search_ms=search_ms,
        )
