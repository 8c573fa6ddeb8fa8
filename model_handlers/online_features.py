"""Reading users' online features from the feature store (Redis), one pipelined round
trip per batch.

The key layout is the contract in `recsys_contracts.feature_keys`: one hash a user, of
which a read takes only what serving needs: HMGET of the user's recent items (newest
first), their online embedding for this model version (little-endian float32 bytes) and
the features, two of which (`events`, `last_ts`) version the rest (the stream job
changes them in the same atomic write as every other field, so equal versions mean equal
features); and, in the same pipeline, an HSCAN of every item they interacted with
(`seen:<item>` fields). Not HGETALL: the hash also holds the job's `state` and maybe
embeddings of other model versions, which a request would transfer for nothing. The seen
items stay one field each (the job adds one without reading the others), and one HSCAN
with a COUNT above the hash's size returns them all, so a batch is still one round trip
(a hash of more than SEEN_SCAN_COUNT fields takes more). A store that is down or slow never fails a request: the
batch goes on without online features and the error is reported for the metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsys_contracts.feature_keys import (
    EVENTS_FIELD,
    FEATURES_FIELD,
    LAST_TS_FIELD,
    RECENT_FIELD,
    SEEN_PREFIX,
    decode_embedding,
    decode_features,
    decode_recent,
    embedding_field,
    seen_items,
    user_key,
)
from recsys_contracts.store_endpoint import StoreEndpoint, StoreMode

log = logging.getLogger(__name__)

WARNING_INTERVAL_S = 10.0
SEEN_SCAN_COUNT = 100_000
"""HSCAN's COUNT: a hash of at most this many fields is scanned in one call."""
MAX_SEEN_SCANS = 100
"""HSCAN calls a user's seen items take at most (a bounded loop)."""
_SEEN_MATCH = f"{SEEN_PREFIX}*"


@dataclass(frozen=True)
class OnlineFeatures:
    """What the store knows about one user right now."""

    recent_item_ids: tuple[str, ...] = ()
    """Newest first."""
    embedding: np.ndarray | None = None
    seen_item_ids: frozenset[str] = frozenset()
    """Every item the user interacted with (the last N are `recent_item_ids`): a heavy
    user's whole history, which serving must not recommend again."""
    state_version: tuple[str, str] | None = None
    """(`events`, `last_ts`) of the user's features hash: changes with every event the
    stream job applies for the user; None when the store holds no state for them."""

    @property
    def empty(self) -> bool:
        return not self.recent_item_ids and self.embedding is None


NO_FEATURES = OnlineFeatures()


@dataclass(frozen=True)
class OnlineRead:
    """Features per requested user (same order), plus what went wrong, if anything."""

    features: list[OnlineFeatures]
    misses: int = 0
    """Users with an id for whom the store had nothing."""
    error: str | None = None
    """Why the store could not be read (then every user misses)."""


class RedisFeatureReader:
    """Reads recent and seen items and online embeddings of a batch of users in one pipeline."""

    def __init__(
        self,
        client: Any,
        *,
        system: str,
        model_version: str,
        dim: int,
        history_length: int,
    ) -> None:
        self.client = client
        self.system = system
        self.model_version = model_version
        self.dim = dim
        self.history_length = history_length
        self._last_warning = -WARNING_INTERVAL_S

    def read(self, user_ids: Sequence[str | None]) -> OnlineRead:
        users = list(dict.fromkeys(u for u in user_ids if u is not None))
        if not users:
            return OnlineRead([NO_FEATURES] * len(user_ids))
        embedding = embedding_field(self.model_version)
        try:
            replies, seen = self._fetch(users, [FEATURES_FIELD, RECENT_FIELD, embedding])
        except Exception as exc:  # the store must never fail a request
            now = time.monotonic()
            if now - self._last_warning >= WARNING_INTERVAL_S:  # a dead store must not flood logs
                self._last_warning = now
                log.warning("feature store read failed for %d users: %s", len(users), exc)
            return OnlineRead(
                [NO_FEATURES] * len(user_ids),
                misses=len(users),
                error=str(exc) or type(exc).__name__,
            )
        by_user: dict[str, OnlineFeatures] = {}
        misses = 0
        for user, (packed, recent, raw_embedding), seen_fields in zip(
            users, replies, seen, strict=True
        ):
            version = decode_features(packed) if packed else None
            features = OnlineFeatures(
                recent_item_ids=tuple(decode_recent(recent))[: self.history_length],
                embedding=decode_embedding(raw_embedding, self.dim) if raw_embedding else None,
                seen_item_ids=frozenset(seen_items(seen_fields)),
                state_version=(
                    (version.get(EVENTS_FIELD, ""), version.get(LAST_TS_FIELD, ""))
                    if version is not None
                    else None
                ),
            )
            misses += features.empty
            by_user[user] = features
        return OnlineRead(
            [by_user[u] if u is not None else NO_FEATURES for u in user_ids], misses=misses
        )

    def _fetch(
        self, users: list[str], fields: list[str]
    ) -> tuple[list[list[Any]], list[dict[Any, Any]]]:
        """Each user's `fields` (HMGET) and seen fields (HSCAN), in one pipeline; a user
        whose HSCAN did not reach the end is scanned on (a hash of more fields than
        SEEN_SCAN_COUNT)."""
        names = [user_key(self.system, user) for user in users]
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(name, fields)
            pipe.hscan(name, 0, match=_SEEN_MATCH, count=SEEN_SCAN_COUNT)
        replies = pipe.execute()
        values = replies[0::2]
        seen: list[dict[Any, Any]] = []
        unfinished: dict[int, int] = {}  # user index -> the cursor to scan on from
        for n, (cursor, found) in enumerate(replies[1::2]):
            seen.append(dict(found))
            if int(cursor):
                unfinished[n] = int(cursor)
        for _ in range(MAX_SEEN_SCANS):
            if not unfinished:
                break
            pipe = self.client.pipeline(transaction=False)
            order = list(unfinished)
            for n in order:
                pipe.hscan(names[n], unfinished[n], match=_SEEN_MATCH, count=SEEN_SCAN_COUNT)
            for n, (cursor, found) in zip(order, pipe.execute(), strict=True):
                seen[n].update(found)
                if int(cursor):
                    unfinished[n] = int(cursor)
                else:
                    del unfinished[n]
        return values, seen


def connect(
    url: str,
    *,
    timeout_s: float,
    password: str | None = None,
    mode: StoreMode | str = StoreMode.SINGLE,
) -> Any:
    """A Redis client with short timeouts (the handler's latency budget is milliseconds):
    a `redis.Redis`, or for `mode` cluster a `RedisCluster` (its pipelines split per node),
    opened at the first read (see `LazyClusterClient`)."""
    endpoint = StoreEndpoint(url, StoreMode(mode))

    def open_client() -> Any:
        return endpoint.connect(
            password=password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
        )

    return LazyClusterClient(open_client) if endpoint.cluster else open_client()


class LazyClusterClient:
    """A cluster client made when first needed, and again after a failure to make it.

    `RedisCluster` asks a node for the slot map as it is created, and fails when none
    answers; `redis.Redis` connects at its first command. So that a store that is down
    (at the model's start, or after) fails no request either way, a client that cannot be
    made yet gives a pipeline whose `execute` raises why: the reader reports it as a
    store error, and the next batch tries again."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._client: Any = None

    def pipeline(self, transaction: bool = False) -> Any:
        if self._client is None:
            try:
                self._client = self._make()
            except Exception as exc:  # redis-py raises RedisClusterException, not ConnectionError
                return _Unreachable(exc)
        return self._client.pipeline(transaction=transaction)

    def __getattr__(self, name: str) -> Any:  # any other command: the client, made now
        if self._client is None:
            self._client = self._make()
        return getattr(self._client, name)


class _Unreachable:
    """A pipeline of a store that cannot be reached: takes commands, raises on execute."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __getattr__(self, name: str) -> Callable[..., _Unreachable]:
        return lambda *args, **kwargs: self

    def execute(self) -> list[Any]:
        raise self.error
