"""Reading and writing a batch of users' features in Redis (the online feature store),
one Redis primary or a Redis Cluster alike.

A batch is split by hash slot: every key of one user shares a slot (the `{user}` hash
tag of `feature_keys`), and a script may only touch keys of one slot in a cluster. On a
single primary the whole batch is one group. Each group is one optimistic transaction:

1. one MGET per group reads its users' states and embeddings (every group's read goes
   out in one pipeline per node, so a batch costs one round trip per node, not per slot;
   see `_send`). A plain command, not a script: a `redis.call` inside Lua costs Redis
   about twice the command itself (issue 15's profile), and a read needs no atomicity
   beyond MGET's own;
2. the job computes the new values for the whole batch at once (pure functions,
   `user_features`);
3. POPULAR_ADD counts the applied interactions into the `popular` zset (see below);
4. WRITE_BATCH, per group, first checks that no user's state changed since it was read
   (SHA-1 of what was read against what is there now), then writes every key of every
   changed user. A script runs atomically, so the derived keys (`recent`, `features`,
   `emb:*`) never disagree with `state`, a job killed mid-write leaves all or nothing
   of each group, and when two consumers touch the same user (Shared subscriptions,
   rebalancing) the second one recomputes instead of overwriting the first. Only the
   groups that lost that race are read and computed again. Of a user whose state is
   still the one this store last wrote, it sends only what changed (`Written`).

Every script declares every key it touches (KEYS), as Redis Cluster requires; the
rest (the plan, the binary values) travels in one JSON argument and one blob, which
redis-py packs far faster than thousands of separate arguments. Redis's CPU goes
mostly to the number of commands a script calls, so the scripts call as few as they
can: POPULAR_ADD checks, records and forgets a batch's events with one command each
(ZMSCORE, ZADD, ZREM over many members), not one per event.

The popular zset is one key, in one slot, so it cannot be written in the same script
as users of other slots. It is written FIRST, idempotently per event: POPULAR_ADD
records each applied event (`<user>:<event id>`) in a zset in the popular key's slot
(`feature_keys.popular_applied_key`) and adds an event's weight only if the event was
not recorded yet. Then:
- a crash after the popular write and before the users' write: the redelivered events
  are applied again to the users (their state never saw them) and POPULAR_ADD skips
  them: counted once;
- a crash after the users' write: the users' state now knows the events (duplicates),
  so they add nothing anywhere: counted once;
- once a batch's users are written, their state deduplicates the events, so the next
  POPULAR_ADD call drops them from the record (`done`); what a crash leaves behind
  expires after `POPULAR_REDO_WINDOW_MS`, the longest a redelivery may take to be
  counted exactly. The record thus holds about one batch of events.
The one case left inexact needs two consumers on one user at once (which KeyShared and
Failover subscriptions rule out): an event counted into popular by a consumer whose
users' write then loses the race, and which its recomputation finds late because the
other consumer moved the user's horizon past it without applying it, stays counted.

Redis errors are not handled here: the job retries the whole batch (every step above
is safe to repeat).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, NamedTuple

import orjson
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from recsys_contracts import feature_keys as keys
from recsys_contracts.events import Event
from stream_jobs.item_embeddings import ItemEmbeddings
from stream_jobs.user_features import (
    FeatureParams,
    Outcome,
    UserUpdate,
    decode_state,
    encode_state,
    popular_weight,
    reader_field_values,
    update_users,
)

MAX_CONFLICT_RETRIES = 20
WRITTEN_CACHE_USERS = 20_000
"""Users whose last write a store remembers (`Written`): 1-4 KB each (the state, the
fields, the recent items)."""
POPULAR_REDO_WINDOW_MS = 24 * 3_600_000
"""How long the popular record keeps an event whose users' write never confirmed it (a
crash): a redelivery within this window is not counted twice."""
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_NOTHING_SHA1 = hashlib.sha1(b"").hexdigest()

# KEYS: per user, its keys (state, recent, features, then one per moved embedding, then
# seen), users one after the other, all in one slot. ARGV[1]: TTL in ms. ARGV[2]: the
# JSON plan: per user `keys` (how many of KEYS are its), `read` (SHA-1 of the state as
# read), `values` ({offset, length} in ARGV[3] of the new state, then of each embedding),
# `recent`, `features` (field, value, ...) and `seen` (items the batch's interactions
# touched). ARGV[3]: the binary values back to back, outside the JSON so that they are
# neither escaped nor decoded.
# `recent` and `features` are whole (`keep` -1: the keys are replaced) or, where the
# job knows what the keys hold (`Written`), only what changed: `features` the changed
# fields, `recent` the new items oldest first, pushed on the head of the list, whose
# first `keep` items stay (`trim`: 1 when items fall off its tail). `length`: how many
# items `recent` holds then.
# Returns 0, writing nothing, when a state changed since it was read; else 1.
WRITE_BATCH = """
local ttl = ARGV[1]
local plan = cjson.decode(ARGV[2])
local blob = ARGV[3]
local function value(span)
  return string.sub(blob, span[1] + 1, span[1] + span[2])
end
local base = 0
for _, user in ipairs(plan.users) do
  if redis.sha1hex(redis.call('GET', KEYS[base + 1]) or '') ~= user.read then
    return 0
  end
  base = base + user.keys
end
base = 0
for _, user in ipairs(plan.users) do
  local state, recent, features, seen = KEYS[base + 1], KEYS[base + 2], KEYS[base + 3],
    KEYS[base + user.keys]
  redis.call('SET', state, value(user.values[1]), 'PX', ttl)
  if user.keep < 0 then
    redis.call('DEL', recent)
    if #user.recent > 0 then
      redis.call('RPUSH', recent, unpack(user.recent))
    end
    redis.call('DEL', features)
  elseif #user.recent > 0 then
    redis.call('LPUSH', recent, unpack(user.recent))
  end
  if user.trim == 1 and user.length > 0 then
    redis.call('LTRIM', recent, 0, user.length - 1)
  elseif user.trim == 1 then
    redis.call('DEL', recent)
  end
  if user.length > 0 then
    redis.call('PEXPIRE', recent, ttl)
  end
  if #user.features > 0 then
    redis.call('HSET', features, unpack(user.features))
  end
  redis.call('PEXPIRE', features, ttl)
  for i = 2, #user.values do
    redis.call('SET', KEYS[base + 2 + i], value(user.values[i]), 'PX', ttl)
  end
  if #user.seen > 0 then
    redis.call('SADD', seen, unpack(user.seen))
  end
  redis.call('PEXPIRE', seen, ttl)
  base = base + user.keys
end
return 1
"""

# KEYS[1]: the popular zset. KEYS[2]: the record of counted events (same slot).
# ARGV[1]: TTL of popular in ms. ARGV[2]: how long the record keeps an event, in ms.
# ARGV[3]: JSON {add: [[event, item, weight], ...], done: [event, ...]}: events to count
# (each at most once), and events whose users' write committed (no longer at risk).
# Members go CHUNK at a time to one ZREM, ZMSCORE or ZADD (unpack's stack is bounded).
# Returns how many of `add` were counted now.
POPULAR_ADD = """
local CHUNK = 1000
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local plan = cjson.decode(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms - tonumber(ARGV[2]))
for first = 1, #plan.done, CHUNK do
  redis.call('ZREM', KEYS[2], unpack(plan.done, first, math.min(first + CHUNK - 1, #plan.done)))
end
local sums, order, counted, taken = {}, {}, 0, {}
for first = 1, #plan.add, CHUNK do
  local last = math.min(first + CHUNK - 1, #plan.add)
  local members = {}
  for n = first, last do
    members[#members + 1] = plan.add[n][1]
  end
  local scores = redis.call('ZMSCORE', KEYS[2], unpack(members))
  local record = {}
  for n = first, last do
    local add = plan.add[n]
    if not scores[n - first + 1] and not taken[add[1]] then
      taken[add[1]] = true
      record[#record + 1] = now_ms
      record[#record + 1] = add[1]
      if sums[add[2]] == nil then
        sums[add[2]] = 0
        order[#order + 1] = add[2]
      end
      sums[add[2]] = sums[add[2]] + tonumber(add[3])
      counted = counted + 1
    end
  end
  if #record > 0 then
    redis.call('ZADD', KEYS[2], unpack(record))
  end
end
for _, item in ipairs(order) do
  redis.call('ZINCRBY', KEYS[1], string.format('%.17g', sums[item]), item)
end
if counted > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return counted
"""


class Written(NamedTuple):
    """What this process last wrote for a user. While the user's state is still the one
    it wrote (a read finds `state`), their `features` hash holds exactly `fields` (in
    `FeatureParams.field_names` order) and their `recent` list `recent`: the script
    writes those keys with the state, atomically, and with the same TTL. So the next write sends only the changed fields and the new recent
    items: fewer and cheaper commands for Redis. Any other writer (another consumer,
    a rebuild, an expiry) changes the state, and the write is whole again."""

    state: bytes
    fields: str
    recent: str
    """The fields' values and the recent items, each joined by `_SEPARATOR`: two strings
    instead of a few dozen objects for the garbage collector to walk, 20,000 users over."""


@dataclass(frozen=True)
class ScriptCall:
    """One EVALSHA: the keys it touches (one slot) and its other arguments."""

    keys: list[str]
    args: tuple[bytes | str | int, ...] = ()


Command = tuple[str, tuple[bytes | str | int, ...]]
"""A key the command touches (where a cluster routes it: all its keys share a slot) and
the command's arguments, its name first."""

StoreClient = redis.Redis | RedisCluster
"""What the store is opened as (`recsys_contracts.store_endpoint`)."""


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
    def __init__(self, client: StoreClient, layout: StoreLayout, params: FeatureParams) -> None:
        self.client = client
        self.layout = layout
        self.params = params
        self._cluster = isinstance(client, RedisCluster)
        self._loaded: dict[str, str] = {}  # script text -> SHA-1 the server knows it by
        self._popular_done: list[str] = []  # events whose users' write committed
        self._written: OrderedDict[str, Written] = OrderedDict()  # oldest write first

    def apply(
        self, events_by_user: Mapping[str, Sequence[Event]], items: Mapping[str, ItemEmbeddings]
    ) -> BatchWrite:
        """Apply each user's events (in order) and write what changed, atomically per slot."""
        versions = list(items)
        updates: dict[str, UserUpdate] = {}
        counted: list[str] = []  # events sent to POPULAR_ADD in this batch
        pending = self._slot_groups(list(events_by_user))
        for _ in range(MAX_CONFLICT_RETRIES):
            users = [user for group in pending for user in group]
            values = self._read(pending, versions)
            fresh = self._compute(users, versions, values, events_by_user, items)
            updates.update(fresh)
            counted += self._add_popular(events_by_user, fresh)
            states_read = dict(zip(users, values[: len(users)], strict=True))
            pending = self._write(pending, fresh, states_read)
            if not pending:
                self._popular_done = list(dict.fromkeys(counted))  # sent with the next POPULAR_ADD
                return BatchWrite(events_by_user, updates, time.time() * 1000)
        raise TooManyConflicts(
            f"{sum(map(len, pending))} users changed by another writer {MAX_CONFLICT_RETRIES} times"
        )

    # --- one batch, slot group by slot group ----------------------------------------

    def _slot_groups(self, users: list[str]) -> list[list[str]]:
        """The users split by the hash slot of their keys: one group on a single node."""
        if not self._cluster or not users:
            return [users] if users else []
        groups: dict[int, list[str]] = {}
        for user in users:
            slot = key_slot(keys.state_key(self.layout.system, user).encode())
            groups.setdefault(slot, []).append(user)
        return list(groups.values())

    def _read(self, groups: list[list[str]], versions: list[str]) -> list[bytes | None]:
        """States of every group's users, then their embeddings (user by user, each in
        `versions` order): the layout `_compute` reads."""
        system = self.layout.system
        reads: list[Command] = []
        for group in groups:
            names = [keys.state_key(system, u) for u in group]
            names += [keys.embedding_key(system, u, v) for u in group for v in versions]
            reads.append((names[0], ("MGET", *names)))
        states: list[bytes | None] = []
        embeddings: list[bytes | None] = []
        for group, values in zip(groups, self._send(reads), strict=True):
            if isinstance(values, Exception):
                raise values
            states += values[: len(group)]
            embeddings += values[len(group) :]
        return states + embeddings

    def _write(
        self,
        groups: list[list[str]],
        updates: dict[str, UserUpdate],
        states_read: Mapping[str, bytes | None],
    ) -> list[list[str]]:
        """Write each group's changed users; returns the groups that lost the race to
        another writer (nothing of theirs was written)."""
        calls: list[ScriptCall] = []
        written: list[tuple[list[str], list[tuple[str, Written]]]] = []
        for group in groups:
            write = self._write_args(
                {u: updates[u] for u in group}, [states_read[u] for u in group]
            )
            if write is not None:  # only duplicates or late events: nothing to write
                calls.append(write[0])
                written.append((group, write[1]))
        results = self._run(WRITE_BATCH, calls)
        lost = []
        for (group, left), ok in zip(written, results, strict=True):
            if ok == 1:
                self._remember(left)
            else:
                lost.append(group)
        return lost

    def _add_popular(
        self, events_by_user: Mapping[str, Sequence[Event]], updates: Mapping[str, UserUpdate]
    ) -> list[str]:
        """Count the applied interactions into `popular`, each event at most once (see the
        module docstring); returns the events sent."""
        half_life = self.layout.popular_half_life_ms
        add: list[tuple[str, str, str]] = []
        for user, update in updates.items():
            for event, outcome in zip(events_by_user[user], update.outcomes, strict=True):
                if outcome is Outcome.APPLIED and event.is_interaction:
                    weight = popular_weight(event.ts, keys.POPULAR_EPOCH_MS, half_life)
                    add.append((_event_member(user, event.event_id), event.item_id, repr(weight)))
        if not add and not self._popular_done:
            return []
        system = self.layout.system
        plan = {"add": add, "done": self._popular_done}
        call = ScriptCall(
            [keys.popular_items_key(system), keys.popular_applied_key(system)],
            (self.layout.ttl_ms, POPULAR_REDO_WINDOW_MS, _JSON.encode(plan)),
        )
        self._run(POPULAR_ADD, [call])
        self._popular_done = []
        return [member for member, _, _ in add]

    def _run(self, script: str, calls: Sequence[ScriptCall]) -> list[Any]:
        """EVALSHA `script` once per call, pipelined (see `_send`); loads the script first
        when a server does not know it (yet). Results in the order of `calls`."""
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(2):
            if not todo:
                return results
            if script not in self._loaded:  # a cluster client loads it on every primary
                self._loaded[script] = str(self.client.script_load(script))
            sha = self._loaded[script]
            replies = self._send(
                [
                    (
                        calls[n].keys[0],
                        ("EVALSHA", sha, len(calls[n].keys), *calls[n].keys, *calls[n].args),
                    )
                    for n in todo
                ]
            )
            forgotten = []
            for n, reply in zip(todo, replies, strict=True):
                if isinstance(reply, redis.exceptions.NoScriptError):
                    forgotten.append(n)  # that server restarted: load it again
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    results[n] = reply
            if forgotten:
                del self._loaded[script]
            todo = forgotten
        if todo:
            raise redis.exceptions.NoScriptError("the server keeps forgetting the scripts")
        return results

    def _send(self, commands: Sequence[Command]) -> list[Any]:
        """One pipeline per node; replies (or the error of each command) in order.

        On a cluster, each node's commands go down that node's own connection, as the
        slot map says: redis-py's cluster pipeline routes and wraps every command in
        Python, ten times the cost. A command the node refuses (MOVED or ASK: the slot
        moved; the cluster busy) or a node that fails goes again through the cluster
        pipeline, which follows the redirect and refreshes the map. Repeating one is
        safe: it was not run, or it is a read, or a WRITE_BATCH finds its states changed,
        or POPULAR_ADD finds its events recorded."""
        cluster = self.client
        if not isinstance(cluster, RedisCluster):
            return _pipelined(cluster, commands)
        by_node: dict[str, list[int]] = {}
        nodes = {}
        for n, (key, _) in enumerate(commands):
            node = cluster.get_node_from_key(key)
            by_node.setdefault(node.name, []).append(n)
            nodes[node.name] = node
        replies: list[Any] = [None] * len(commands)
        again: list[int] = []
        for name, indexes in by_node.items():
            connection = cluster.get_redis_connection(nodes[name])
            try:
                node_replies = _pipelined(connection, [commands[n] for n in indexes])
            except (redis.ConnectionError, redis.TimeoutError):
                again += indexes
                continue
            for n, reply in zip(indexes, node_replies, strict=True):
                if isinstance(reply, _ELSEWHERE):
                    again.append(n)
                else:
                    replies[n] = reply
        if again:
            redone = _pipelined(cluster, [commands[n] for n in again])
            for n, reply in zip(again, redone, strict=True):
                replies[n] = reply
        return replies

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
    ) -> tuple[ScriptCall, list[tuple[str, Written]]] | None:
        """WRITE_BATCH for the changed users (of one slot), and what they will hold once it
        committed; None when no user changed."""
        system = self.layout.system
        names = self.params.field_names
        blob: list[bytes] = []
        offset = 0

        def put(data: bytes) -> list[int]:
            nonlocal offset
            blob.append(data)
            offset += len(data)
            return [offset - len(data), len(data)]

        all_keys: list[str] = []
        plan_users: list[dict[str, Any]] = []
        written: list[tuple[str, Written]] = []
        for (user, update), read in zip(updates.items(), states_read, strict=True):
            if not update.changed:
                continue  # only duplicates or late events: nothing to write
            user_keys = [
                keys.state_key(system, user),
                keys.recent_items_key(system, user),
                keys.features_key(system, user),
            ]
            state = encode_state(update.state)
            values = [put(state)]
            for version, vector in update.embeddings.items():
                user_keys.append(keys.embedding_key(system, user, version))
                values.append(put(keys.encode_embedding(vector)))
            user_keys.append(keys.seen_items_key(system, user))  # last: the script finds it there
            field_values, recent_list = reader_field_values(update.state, self.params)
            plan: dict[str, Any] = {
                "keys": len(user_keys),
                "read": hashlib.sha1(read).hexdigest() if read else _NOTHING_SHA1,
                "values": values,
                "seen": sorted({item_id for item_id, _ in update.touched_items}),
                "length": len(recent_list),
            }
            before = self._written.get(user)
            if before is not None and read == before.state:  # the keys hold `before`
                changed: list[str] = []
                old = before.fields.split(_SEPARATOR)
                for name, now, then in zip(names, field_values, old, strict=True):
                    if now != then:
                        changed += (name, now)
                plan["features"] = changed
                stored = before.recent.split(_SEPARATOR) if before.recent else []
                new_items = _new_head(stored, recent_list)
                plan["recent"] = recent_list[new_items - 1 :: -1] if new_items else ()
                keep = len(recent_list) - new_items
                plan["keep"], plan["trim"] = keep, int(len(stored) > keep)
            else:
                plan["features"] = list(chain.from_iterable(zip(names, field_values, strict=True)))
                plan["recent"], plan["keep"], plan["trim"] = recent_list, -1, 0
            all_keys += user_keys
            plan_users.append(plan)
            remembered = _written(state, field_values, recent_list)
            if remembered is not None:
                written.append((user, remembered))
        if not plan_users:
            return None
        args = (self.layout.ttl_ms, orjson.dumps({"users": plan_users}), b"".join(blob))
        return ScriptCall(all_keys, args), written

    def _remember(self, written: Sequence[tuple[str, Written]]) -> None:
        """Keep what a committed write left, for the newest WRITTEN_CACHE_USERS users."""
        cache = self._written
        for user, entry in written:
            cache[user] = entry
            cache.move_to_end(user)
        while len(cache) > WRITTEN_CACHE_USERS:
            cache.popitem(last=False)


_SEPARATOR = "\x1f"


def _written(state: bytes, fields: Sequence[str], recent: Sequence[str]) -> Written | None:
    """What to remember of a write; None when a value holds the separator (ids do not,
    by the event schema; then the next write is whole)."""
    joined_fields, joined_recent = _SEPARATOR.join(fields), _SEPARATOR.join(recent)
    if joined_fields.count(_SEPARATOR) != len(fields) - 1 or (
        recent and joined_recent.count(_SEPARATOR) != len(recent) - 1
    ):
        return None
    return Written(state, joined_fields, joined_recent)


def _new_head(before: Sequence[str], after: Sequence[str]) -> int:
    """How many items at the head of the `recent` list `after` are new to the stored
    `before`: the fewest k such that the rest of `after` is what `before` starts with
    (len(after) when nothing is shared, or an event within the lateness went in between)."""
    n = len(after)
    k = 0
    while after[k:] != before[: n - k]:
        k += 1
    return k


# Replies of a node that does not (or not now) serve the call's slot.
_ELSEWHERE = (
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)


def _pipelined(client: Any, commands: Sequence[Command]) -> list[Any]:
    """`commands` in one non-transactional pipeline of `client` (a node or the cluster
    client); an error is returned in its command's place, not raised."""
    pipe = client.pipeline(transaction=False)
    for _, args in commands:
        # execute_command: the cluster pipeline blocks its evalsha() method, not the
        # command, which it routes by the keys' slot
        pipe.execute_command(*args)
    return list(pipe.execute(raise_on_error=False))


def _event_member(user_id: str, event_id: str) -> str:
    """An event in the popular record: event ids are unique per user (length-prefixed,
    so no user id and event id pair reads as another)."""
    return f"{len(user_id)}:{user_id}:{event_id}"
