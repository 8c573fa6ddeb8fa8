"""The online feature store's key layout: the one contract between the stream
jobs (writers) and the serving handler (reader).

Every key starts with `recsys:v2:<system>:` so several RecommenderSystems can
share one Redis, and so a layout change bumps the version instead of misreading
old data. A user's features are ONE hash, `recsys:v2:<system>:u:{<user>}`: the user id
sits inside `{...}`, Redis Cluster's hash tag (and the v1 keys of the same user carry
the same tag, so an upgrade reads them in the same slot). One key a user means one
write and one TTL a user: Redis's CPU follows the number of commands (issue 15), and
the five keys of v1 cost 9-11 of them a user. `popular` has no tag (it hashes on its
whole name); the key kept next to it takes that whole name as its tag, so the two
share a slot too (and, like every key, it starts with `recsys:v2:<system>:`, so
deleting a system's keys by that prefix deletes it with `popular`).

| key | type | written by | content |
|---|---|---|---|
| `recsys:v2:<system>:u:{<user>}` | hash | stream job | the user's features, recent and seen items, embeddings and state: fields below |
| `recsys:v2:<system>:popular` | zset | stream job | item id -> decayed interaction count (cold-start fallback) |
| `recsys:v2:<system>:popular-applied:{recsys:v2:<system>:popular}` | zset | stream job (Redis Cluster only) | events counted into `popular` whose users' write is not confirmed yet -> server time (ms) they were counted; the job's own (see `stream_jobs.feature_store`) |
| `recsys:v2:<system>:rebuilding` | string | rebuild (`stream_jobs.rebuild`) | set while a rebuild from the topic runs (the epoch ms it began), deleted when it ends: one left behind says the store holds a partial rebuild |

The user hash carries the store TTL (`spec.features.store.ttl`), renewed by every write.

Fields of the user hash:

| field | meaning |
|---|---|
| `features` | the user's features, one JSON object (below) |
| `recent` | the last N item ids, newest first, separated by one space (ids hold no whitespace, by the event schema) |
| `seen:<item>` | one field (value `1`) per item the user ever interacted with (not only the last N): serving never recommends them |
| `emb:<model_version>` | online user embedding, little-endian float32 x embeddingDim (bytes) |
| `embedding-versions` | the model versions the hash holds an `emb:` field of, one JSON list: a write deletes the embeddings of versions the job no longer serves |
| `state` | the job's private per-user state (compact binary; JSON from older jobs still loads), for idempotence and windows (bytes) |

The `features` object: one JSON object rather than a field each, since Redis's cost of a
write grows with its fields (a whole write of 18 fields cost it twice one of the same
features packed). Every value is a string; empty means "not known yet":

| key | meaning |
|---|---|
| `count:<type>:<window>` | events of `<type>` (view, click, purchase, dwell, impression) in `<window>` (e.g. `1h`), for every type and window, zeros included |
| `last_ts` | the user's newest event time, epoch ms (time since last event = now - last_ts) |
| `previous_gap_ms` | time between the user's two newest events |
| `dwell_mean_ms`, `dwell_events` | mean `dwell_ms` over the events that carried one, and how many did |
| `session_id`, `session_start_ts`, `session_events` | the current session (events less than the session gap apart) |
| `events` | events applied for this user since the state was created |

Windows end at the user's newest event (event time), not at the time of reading. An
embedding field of a model version the job no longer serves is deleted by the user's next
write (`embedding-versions` tells which the hash holds, without another read).
Readers take the fields they need (HMGET of `features`, `recent`, their `emb:` field, and
an HSCAN of `seen:*` in the same pipeline), not the whole hash: `state` and other
versions' embeddings stay on the server.

Idempotence: `state` holds the ids of the user's newest applied events (bounded,
`dedup_capacity`) and a horizon time; an event whose id is there, or whose `ts` is at or
before the horizon, changes nothing. `state` and the fields derived from it are one
hash, written by one command, so they never disagree.

`popular` scores are forward-decayed counts: each interaction adds
`2 ** ((ts - POPULAR_EPOCH_MS) / half_life)`. Compare scores, do not read them as
counts; the ranking equals that of counts decayed to any common time.

Upgrading from v1 (five keys a user: `...:u:{<user>}:state`, `:recent`, `:features`,
`:emb:<version>`, `:seen`) loses nothing and needs no downtime: the stream job reads a
user's v1 `state`, `seen` and embeddings when the user has no v2 hash yet, and writes
them into the v2 hash with the user's next events (so windows, idempotence, the seen
set and the embeddings carry over); the v1 `popular` scores are copied into the v2
zset (members not there yet) by the first batch of a job that finds no v2 `popular`,
and the v1 record of counted events is honoured, so an event counted by a v1 job just
before it stopped is not counted again. The v1 keys are left to their TTL. Until a
user's next event the serving handler, which reads v2 only, has no online features for
them (it serves them as a cold user). `recsys features rebuild` over a v1 store does the
same upgrade for every user whose events the topic still holds.

No v1 job may write while a v2 job runs: the v2 job reads v1 keys without watching them
and copies the v1 popular scores once, so what a v1 job writes after that is lost to v2.
The operator rolls the feature job's Deployment with a surge (a new pod is ready before
an old one goes), so a v1 and a v2 pod would overlap for a while: stop the v1 job first
(`kubectl scale deployment <name>-features --replicas=0`), then upgrade the operator,
whose reconcile sets the replicas again with the v2 image (an autoscaled job: scale it
back yourself, as an autoscaler leaves a Deployment at zero alone); the events that
arrived meanwhile wait in the subscription.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import numpy as np

LAYOUT_VERSION = "v2"
EVENTS_FIELD = "events"
"""Feature: events applied for the user (with `last_ts`, the version of their state)."""
LAST_TS_FIELD = "last_ts"
FEATURES_FIELD = "features"
STATE_FIELD = "state"
RECENT_FIELD = "recent"
SEEN_PREFIX = "seen:"
EMBEDDING_PREFIX = "emb:"
EMBEDDING_VERSIONS_FIELD = "embedding-versions"
POPULAR_EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, the landmark of popular scores


def system_id(namespace: str, name: str) -> str:
    """The `<system>` part of every key for the RecommenderSystem `namespace/name`."""
    return f"{namespace}.{name}"


def user_key(system: str, user_id: str) -> str:
    """The hash holding everything the store knows of one user."""
    return f"recsys:{LAYOUT_VERSION}:{system}:u:{{{user_id}}}"


def user_keys_pattern(system: str, version: str = LAYOUT_VERSION) -> str:
    """A Redis SCAN/KEYS pattern of every per-user key of `system` (of layout `version`)."""
    return f"recsys:{version}:{system}:u:*"


def embedding_field(model_version: str) -> str:
    return f"{EMBEDDING_PREFIX}{model_version}"


def seen_field(item_id: str) -> str:
    return f"{SEEN_PREFIX}{item_id}"


def popular_items_key(system: str, version: str = LAYOUT_VERSION) -> str:
    return f"recsys:{version}:{system}:popular"


def rebuild_marker_key(system: str) -> str:
    return f"recsys:{LAYOUT_VERSION}:{system}:rebuilding"


def popular_applied_key(system: str, version: str = LAYOUT_VERSION) -> str:
    """The record of events counted into `popular`, in the same hash slot as it: its hash
    tag is the popular key's whole name (system ids hold no braces)."""
    popular = popular_items_key(system, version)
    return f"{popular}-applied:{{{popular}}}"


def encode_recent(item_ids: Iterable[str]) -> str:
    """The `recent` field of items newest first."""
    return " ".join(item_ids)


def decode_recent(value: bytes | str | None) -> list[str]:
    """The item ids of a `recent` field, newest first."""
    if not value:
        return []
    text = value.decode() if isinstance(value, bytes) else value
    return text.split(" ")


def encode_features(features: dict[str, str]) -> bytes:
    """The `features` field of the reader features `features` (compact JSON, UTF-8)."""
    # Imported here, not above: only the feature job writes this field, and the operator
    # and the serving handler, which import this module, do not install orjson.
    import orjson

    return orjson.dumps(features)


def decode_features(value: bytes | str | None) -> dict[str, str]:
    """The features of a `features` field (empty when there is none)."""
    if not value:
        return {}
    features = json.loads(value)
    return features if isinstance(features, dict) else {}


def seen_items(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> set[str]:
    """The seen items among a user hash's fields (as HGETALL gives them)."""
    found = set()
    for name in fields:
        text = name.decode("utf-8", errors="replace") if isinstance(name, bytes) else name
        if text.startswith(SEEN_PREFIX):
            found.add(text[len(SEEN_PREFIX) :])
    return found


def encode_embedding(vector: np.ndarray) -> bytes:
    """Bytes stored for an embedding: little-endian float32."""
    return np.asarray(vector, dtype="<f4").tobytes()


def decode_embedding(data: bytes, dim: int) -> np.ndarray | None:
    """The embedding stored in `data`, or None when it is missing or of another dimension."""
    if not data or len(data) != 4 * dim:
        return None
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def count_field(event_type: str, window: str) -> str:
    """The user hash field holding the count of `event_type` events in `window`."""
    return f"count:{event_type}:{window}"


def _v1_user(system: str, user_id: str) -> str:
    return f"recsys:v1:{system}:u:{{{user_id}}}"


def v1_state_key(system: str, user_id: str) -> str:
    """Layout v1's state key, read only to upgrade a store (see above); likewise below."""
    return f"{_v1_user(system, user_id)}:state"


def v1_seen_items_key(system: str, user_id: str) -> str:
    return f"{_v1_user(system, user_id)}:seen"


def v1_embedding_key(system: str, user_id: str, model_version: str) -> str:
    return f"{_v1_user(system, user_id)}:emb:{model_version}"
