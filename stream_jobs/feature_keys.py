"""The online feature store's key layout: the one contract between the stream
jobs (writers) and the serving handler (reader).

Every key starts with `recsys:v1:<system>:` so several RecommenderSystems can
share one Redis, and so a future layout change bumps `v1` instead of misreading
old data. The user id sits inside `{...}`, Redis Cluster's hash tag, so all of
one user's keys live in one slot and a pipeline per user never crosses nodes.

| key | type | written by | content |
|---|---|---|---|
| `recsys:v1:<system>:u:{<user>}:recent` | list | stream job | item ids, newest first, trimmed to lastN |
| `recsys:v1:<system>:u:{<user>}:features` | hash | stream job | counts per type and window, last event ts, mean dwell, session |
| `recsys:v1:<system>:u:{<user>}:emb:<model_version>` | string | stream job | online user embedding, little-endian float32 x embeddingDim |
| `recsys:v1:<system>:u:{<user>}:state` | string | stream job | the job's private per-user state (JSON), for idempotence and windows |
| `recsys:v1:<system>:popular` | zset | stream job | item id -> decayed interaction count (cold-start fallback) |

All per-user keys carry the store TTL (`spec.features.store.ttl`).
"""

from __future__ import annotations

import numpy as np

LAYOUT_VERSION = "v1"


def system_id(namespace: str, name: str) -> str:
    """The `<system>` part of every key for the RecommenderSystem `namespace/name`."""
    return f"{namespace}.{name}"


def _user(system: str, user_id: str) -> str:
    return f"recsys:{LAYOUT_VERSION}:{system}:u:{{{user_id}}}"


def recent_items_key(system: str, user_id: str) -> str:
    return f"{_user(system, user_id)}:recent"


def features_key(system: str, user_id: str) -> str:
    return f"{_user(system, user_id)}:features"


def embedding_key(system: str, user_id: str, model_version: str) -> str:
    return f"{_user(system, user_id)}:emb:{model_version}"


def state_key(system: str, user_id: str) -> str:
    return f"{_user(system, user_id)}:state"


def popular_items_key(system: str) -> str:
    return f"recsys:{LAYOUT_VERSION}:{system}:popular"


def encode_embedding(vector: np.ndarray) -> bytes:
    """Bytes stored for an embedding: little-endian float32."""
    return np.asarray(vector, dtype="<f4").tobytes()


def decode_embedding(data: bytes, dim: int) -> np.ndarray | None:
    """The embedding stored in `data`, or None when it is missing or of another dimension."""
    if not data or len(data) != 4 * dim:
        return None
    return np.frombuffer(data, dtype="<f4").astype(np.float32)
