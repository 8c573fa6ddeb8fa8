"""Reading users' online features from the feature store (Redis), one pipelined round
trip per batch.

The key layout is the contract in `recsys_contracts.feature_keys`: the user's recent items
(a list, newest first), every item they interacted with (a set), their online
embedding for this model version (little-endian float32 bytes), and two fields of their
features hash (`events`, `last_ts`) that version the rest: the stream job changes them in
the same atomic write as every other key, so equal versions mean equal features. A store that is down or slow never fails a request: the
batch goes on without online features and the error is reported for the metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsys_contracts.feature_keys import (
    EVENTS_FIELD,
    LAST_TS_FIELD,
    decode_embedding,
    embedding_key,
    features_key,
    recent_items_key,
    seen_items_key,
)

log = logging.getLogger(__name__)

WARNING_INTERVAL_S = 10.0
READS_PER_USER = 4  # recent, embedding, seen, state version: one pipeline for the batch


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
        pipe = self.client.pipeline(transaction=False)
        for user in users:
            pipe.lrange(recent_items_key(self.system, user), 0, self.history_length - 1)
            pipe.get(embedding_key(self.system, user, self.model_version))
            pipe.smembers(seen_items_key(self.system, user))
            pipe.hmget(features_key(self.system, user), EVENTS_FIELD, LAST_TS_FIELD)
        try:
            replies = pipe.execute()
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
        for n, user in enumerate(users):
            recent, raw_embedding, seen, (events, last_ts) = replies[
                READS_PER_USER * n : READS_PER_USER * (n + 1)
            ]
            features = OnlineFeatures(
                recent_item_ids=tuple(_text(item) for item in recent or ()),
                embedding=decode_embedding(raw_embedding, self.dim) if raw_embedding else None,
                seen_item_ids=frozenset(_text(item) for item in seen or ()),
                state_version=(
                    (_text(events or b""), _text(last_ts or b""))
                    if events is not None or last_ts is not None
                    else None
                ),
            )
            misses += features.empty
            by_user[user] = features
        return OnlineRead(
            [by_user[u] if u is not None else NO_FEATURES for u in user_ids], misses=misses
        )


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def connect(url: str, *, timeout_s: float, password: str | None = None) -> Any:
    """A Redis client with short timeouts (the handler's latency budget is milliseconds)."""
    import redis

    return redis.Redis.from_url(
        url,
        password=password or None,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )
