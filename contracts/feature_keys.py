"""The online feature store's key layout: the one contract between the stream
jobs (writers) and the serving handler (reader).

Every key starts with `recsys:v1:<system>:` so several RecommenderSystems can
share one Redis, and so a future layout change bumps `v1` instead of misreading
old data. The user id sits inside `{...}`, Redis Cluster's hash tag, so all of
one user's keys live in one slot and a pipeline per user never crosses nodes.
`popular` has no tag (it hashes on its whole name); the key kept next to it takes
that whole name as its tag, so the two share a slot too (and, like every key, it
starts with `recsys:v1:<system>:`, so deleting a system's keys by that prefix
deletes it with `popular`).

| key | type | written by | content |
|---|---|---|---|
| `recsys:v1:<system>:u:{<user>}:recent` | list | stream job | item ids, newest first, trimmed to lastN |
| `recsys:v1:<system>:u:{<user>}:features` | hash | stream job | counts per type and window, last event ts, mean dwell, session |
| `recsys:v1:<system>:u:{<user>}:emb:<model_version>` | string | stream job | online user embedding, little-endian float32 x embeddingDim |
| `recsys:v1:<system>:u:{<user>}:state` | string | stream job | the job's private per-user state (compact binary; JSON from older jobs still loads), for idempotence and windows |
| `recsys:v1:<system>:u:{<user>}:seen` | set | stream job | every item the user interacted with (not only the last N): serving never recommends them |
| `recsys:v1:<system>:popular` | zset | stream job | item id -> decayed interaction count (cold-start fallback) |
| `recsys:v1:<system>:popular-applied:{recsys:v1:<system>:popular}` | zset | stream job | events counted into `popular` whose users' write is not confirmed yet -> server time (ms) they were counted; the job's own (see `stream_jobs.feature_store`) |

All per-user keys carry the store TTL (`spec.features.store.ttl`).

Fields of the `features` hash (all values are strings; empty means "not known yet"):

| field | meaning |
|---|---|
| `count:<type>:<window>` | events of `<type>` (view, click, purchase, dwell, impression) in `<window>` (e.g. `1h`), for every type and window, zeros included |
| `last_ts` | the user's newest event time, epoch ms (time since last event = now - last_ts) |
| `previous_gap_ms` | time between the user's two newest events |
| `dwell_mean_ms`, `dwell_events` | mean `dwell_ms` over the events that carried one, and how many did |
| `session_id`, `session_start_ts`, `session_events` | the current session (events less than the session gap apart) |
| `events` | events applied for this user since the state was created |

Windows end at the user's newest event (event time), not at the time of reading.

Idempotence: the `state` key holds the ids of the user's newest applied events
(bounded, `dedup_capacity`) and a horizon time; an event whose id is there, or
whose `ts` is at or before the horizon, changes nothing. `state` and the keys
derived from it are written by one atomic Lua script, so they never disagree.

`popular` scores are forward-decayed counts: each interaction adds
`2 ** ((ts - POPULAR_EPOCH_MS) / half_life)`. Compare scores, do not read them as
counts; the ranking equals that of counts decayed to any common time.
"""

from __future__ import annotations

import numpy as np

LAYOUT_VERSION = "v1"
EVENTS_FIELD = "events"
"""`features` hash field: events applied for the user (with `last_ts`, the version of their state)."""
LAST_TS_FIELD = "last_ts"
POPULAR_EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, the landmark of popular scores


def system_id(namespace: str, name: str) -> str:
    """The `<system>` part of every key for the RecommenderSystem `namespace/name`."""
    return f"{namespace}.{name}"


def _user(system: str, user_id: str) -> str:
    return f"recsys:{LAYOUT_VERSION}:{system}:u:{{{user_id}}}"


def user_keys_pattern(system: str) -> str:
    """A Redis SCAN/KEYS pattern of every per-user key of `system`."""
    return f"recsys:{LAYOUT_VERSION}:{system}:u:*"


def recent_items_key(system: str, user_id: str) -> str:
    return f"{_user(system, user_id)}:recent"


def features_key(system: str, user_id: str) -> str:
    return f"{_user(system, user_id)}:features"


def embedding_key(system: str, user_id: str, model_version: str) -> str:
    return f"{_user(system, user_id)}:emb:{model_version}"


def seen_items_key(system: str, user_id: str) -> str:
    return f"{_user(system, user_id)}:seen"


def state_key(system: str, user_id: str) -> str:
    return f"{_user(system, user_id)}:state"


def popular_items_key(system: str) -> str:
    return f"recsys:{LAYOUT_VERSION}:{system}:popular"


def popular_applied_key(system: str) -> str:
    """The record of events counted into `popular`, in the same hash slot as it: its hash
    tag is the popular key's whole name (system ids hold no braces)."""
    popular = popular_items_key(system)
    return f"{popular}-applied:{{{popular}}}"


def encode_embedding(vector: np.ndarray) -> bytes:
    """Bytes stored for an embedding: little-endian float32."""
    return np.asarray(vector, dtype="<f4").tobytes()


def decode_embedding(data: bytes, dim: int) -> np.ndarray | None:
    """The embedding stored in `data`, or None when it is missing or of another dimension."""
    if not data or len(data) != 4 * dim:
        return None
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def count_field(event_type: str, window: str) -> str:
    """The `features` hash field holding the count of `event_type` events in `window`."""
    return f"count:{event_type}:{window}"
