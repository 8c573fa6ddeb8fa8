"""Reading and writing a batch of users' features in Redis (the online feature store).

One batch is one optimistic transaction made of two Lua scripts:

1. READ_VALUES returns the users' states and embeddings;
2. the job computes the new values (pure functions, `user_features`);
3. WRITE_BATCH first checks that no user's state changed since it was read
   (SHA-1 of what was read against what is there now), then writes every key of
   every changed user. A script runs atomically, so the derived keys (`recent`,
   `features`, `emb:*`, `popular`) never disagree with `state`, a job killed
   mid-write leaves all or nothing, and when two consumers touch the same user
   (Shared subscriptions, rebalancing) the second one recomputes instead of
   overwriting the first.

Why scripts rather than WATCH, MGET and MULTI/EXEC: key names and values travel
inside one JSON argument and one binary blob, instead of thousands of command
arguments that redis-py packs one by one in Python; that packing was the largest
single cost per event. The keys are not declared as KEYS, which a single Redis
primary allows and Redis Cluster would not (a batch spans users in many slots).

Redis errors are not handled here: the job retries the whole batch.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import orjson
import redis

from recsys_contracts import feature_keys as keys
from recsys_contracts.events import Event
from stream_jobs.item_embeddings import ItemEmbeddings
from stream_jobs.user_features import (
    FeatureParams,
    UserUpdate,
    decode_state,
    encode_state,
    popular_weight,
    reader_values,
    update_users,
)

MAX_CONFLICT_RETRIES = 20
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_NOTHING_SHA1 = hashlib.sha1(b"").hexdigest()

# ARGV[1]: JSON list of keys. Returns their values (nil where missing).
READ_VALUES = """
local names = cjson.decode(ARGV[1])
local values = {}
for i, name in ipairs(names) do
  values[i] = redis.call('GET', name)
end
return values
"""

# ARGV[1]: TTL in ms. ARGV[2]: the JSON plan: per user its keys (state, recent,
# features, then one per moved embedding, then seen), `read` (SHA-1 of the state as read),
# `values` ({offset, length} in ARGV[3] of the new state, then of each
# embedding), `recent`, `features` (field, value, ...) and `seen` (items the batch's
# interactions touched); then `popular` (item,
# weight, ...) and its key. ARGV[3]: the binary values back to back, outside the
# JSON so that they are neither escaped nor decoded.
# Returns 0, writing nothing, when a state changed since it was read; else 1.
WRITE_BATCH = """
local ttl = ARGV[1]
local plan = cjson.decode(ARGV[2])
local blob = ARGV[3]
local function value(span)
  return string.sub(blob, span[1] + 1, span[1] + span[2])
end
for _, user in ipairs(plan.users) do
  if redis.sha1hex(redis.call('GET', user.keys[1]) or '') ~= user.read then
    return 0
  end
end
for _, user in ipairs(plan.users) do
  local k = user.keys
  redis.call('SET', k[1], value(user.values[1]), 'PX', ttl)
  redis.call('DEL', k[2])
  if #user.recent > 0 then
    redis.call('RPUSH', k[2], unpack(user.recent))
    redis.call('PEXPIRE', k[2], ttl)
  end
  redis.call('DEL', k[3])
  redis.call('HSET', k[3], unpack(user.features))
  redis.call('PEXPIRE', k[3], ttl)
  for i = 2, #user.values do
    redis.call('SET', k[2 + i], value(user.values[i]), 'PX', ttl)
  end
  if #user.seen > 0 then
    redis.call('SADD', k[#k], unpack(user.seen))
  end
  redis.call('PEXPIRE', k[#k], ttl)
end
for i = 1, #plan.popular, 2 do
  redis.call('ZINCRBY', plan.popular_key, plan.popular[i + 1], plan.popular[i])
end
if #plan.popular > 0 then
  redis.call('PEXPIRE', plan.popular_key, ttl)
end
return 1
"""


class TooManyConflicts(RuntimeError):
    """Another writer kept changing the same users; the batch was not written."""


@dataclass
class BatchWrite:
    """The result of one written batch."""

    events: Mapping[str, Sequence[Event]] = field(default_factory=dict)
    """user id -> that user's events in the batch, in arrival order."""
    updates: dict[str, UserUpdate] = field(default_factory=dict)
    """user id -> what those events did (outcomes in the same order)."""
    written_at_ms: float = 0.0
    """Wall-clock time right after the write committed."""


@dataclass(frozen=True)
class StoreLayout:
    """How values are kept: which system's keys, and for how long."""

    system: str
    ttl_ms: int
    popular_half_life_ms: int


class FeatureStore:
    def __init__(self, client: redis.Redis, layout: StoreLayout, params: FeatureParams) -> None:
        self.client = client
        self.layout = layout
        self.params = params
        self._loaded: dict[str, str] = {}  # script text -> SHA-1 the server knows it by

    def apply(
        self, events_by_user: Mapping[str, Sequence[Event]], items: Mapping[str, ItemEmbeddings]
    ) -> BatchWrite:
        """Apply each user's events (in order) and write what changed, atomically."""
        system = self.layout.system
        users = list(events_by_user)
        versions = list(items)
        read_keys = [keys.state_key(system, u) for u in users]
        read_keys += [keys.embedding_key(system, u, v) for u in users for v in versions]
        for _ in range(MAX_CONFLICT_RETRIES):
            values = self._run(READ_VALUES, _JSON.encode(read_keys))
            updates = self._compute(users, versions, values, events_by_user, items)
            args = self._write_args(updates, values[: len(users)])
            if args is None or self._run(WRITE_BATCH, *args) == 1:
                return BatchWrite(events_by_user, updates, time.time() * 1000)
        raise TooManyConflicts(
            f"{len(users)} users changed by another writer {MAX_CONFLICT_RETRIES} times"
        )

    def _run(self, script: str, *args: bytes | str | int) -> Any:
        """EVALSHA `script`, loading it first when the server does not know it (yet)."""
        for _ in range(2):
            if script not in self._loaded:
                self._loaded[script] = str(self.client.script_load(script))
            try:
                return self.client.evalsha(self._loaded[script], 0, *args)
            except redis.exceptions.NoScriptError:  # the server restarted: load it again
                del self._loaded[script]
        raise redis.exceptions.NoScriptError("the server keeps forgetting the scripts")

    def _compute(
        self,
        users: list[str],
        versions: list[str],
        values: Sequence[bytes | None],
        events_by_user: Mapping[str, Sequence[Event]],
        items: Mapping[str, ItemEmbeddings],
    ) -> dict[str, UserUpdate]:
        n = len(users)
        # values: the n states, then per user one embedding per version (user-major).
        stored = {v: values[n + j :: len(versions)] for j, v in enumerate(versions)}
        states = [decode_state(value, self.params) for value in values[:n]]
        batch = update_users(states, stored, [events_by_user[u] for u in users], self.params, items)
        return dict(zip(users, batch, strict=True))

    def _write_args(
        self, updates: dict[str, UserUpdate], states_read: Sequence[bytes | None]
    ) -> tuple[int, bytes, bytes] | None:
        """WRITE_BATCH's arguments for the changed users; None when no user changed."""
        system = self.layout.system
        blob: list[bytes] = []
        offset = 0

        def put(data: bytes) -> list[int]:
            nonlocal offset
            blob.append(data)
            offset += len(data)
            return [offset - len(data), len(data)]

        plan_users: list[dict[str, Any]] = []
        popular: dict[str, float] = {}
        for (user, update), read in zip(updates.items(), states_read, strict=True):
            if not update.changed:
                continue  # only duplicates or late events: nothing to write
            user_keys = [
                keys.state_key(system, user),
                keys.recent_items_key(system, user),
                keys.features_key(system, user),
            ]
            values = [put(encode_state(update.state))]
            for version, vector in update.embeddings.items():
                user_keys.append(keys.embedding_key(system, user, version))
                values.append(put(keys.encode_embedding(vector)))
            user_keys.append(keys.seen_items_key(system, user))  # last: the script finds it there
            fields, recent = reader_values(update.state, self.params)
            plan_users.append(
                {
                    "keys": user_keys,
                    "read": hashlib.sha1(read).hexdigest() if read else _NOTHING_SHA1,
                    "values": values,
                    "recent": recent,
                    "features": list(chain.from_iterable(fields.items())),
                    "seen": sorted({item_id for item_id, _ in update.touched_items}),
                }
            )
            for item_id, ts in update.touched_items:
                weight = popular_weight(ts, keys.POPULAR_EPOCH_MS, self.layout.popular_half_life_ms)
                popular[item_id] = popular.get(item_id, 0.0) + weight
        if not plan_users:
            return None
        plan = {
            "users": plan_users,
            "popular": [x for item, weight in popular.items() for x in (item, repr(weight))],
            "popular_key": keys.popular_items_key(system),
        }
        return self.layout.ttl_ms, orjson.dumps(plan), b"".join(blob)
