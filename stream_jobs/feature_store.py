"""Reading and writing a batch of users' features in Redis (the online feature store),
one Redis primary or a Redis Cluster alike.

Each user is one hash (`feature_keys.user_key`: state, the features as one JSON value,
recent and seen items, embeddings), so a user costs Redis one HSET and one PEXPIRE a
write: Redis's CPU follows the number of commands and of their arguments (issue 15's
profile: a command called from Lua costs about twice the command itself, and v1's five
keys a user cost 9-11 calls; a whole write of 18 feature fields twice one of them
packed).

On a single primary a batch is written as optimistic transactions of
`TRANSACTION_USERS` users, in native commands, each transaction on its own connection
(`_transaction_connections`), up to `TRANSACTION_CONNECTIONS` of them in flight at once
(a wave; a larger batch goes in several waves, each as below):

1. one round trip: WATCH the transaction's users' hashes, then HMGET each user's state
   and embeddings;
2. the job computes the new values for the whole batch at once (pure functions,
   `user_features`);
3. one round trip: MULTI, per changed user one HSET (the state, the features, what else
   changed)
   and, unless this process renewed it a moment ago (`TTL_RENEWAL`), one PEXPIRE, one
   ZINCRBY per item the transaction's applied interactions touched (and one PEXPIRE of
   `popular`), EXEC. EXEC runs all of it or, when any watched hash changed since the
   WATCH (another consumer on the same user: Shared subscriptions, rebalancing; a
   rebuild; an expiry), nothing: then only that transaction's users are read and
   computed again. A job killed before EXEC leaves nothing of it; Redis applies a
   transaction whole (also when loading its AOF: an unfinished one at its end is
   dropped), so `state` and what derives from it never disagree.

Popular counts exactly once per applied interaction on a single primary, with no record
of counted events: an event's popular increment is in the same transaction as the state
that records the event. A crash before EXEC leaves neither (the redelivered event is
applied and counted then); after it, both (the redelivered event is a duplicate and
counts nowhere); a lost race leaves neither (the recomputation applies and counts it,
or finds it a duplicate or late, and then counts it nowhere). So the inexact case of
the cluster below does not arise here.

On a Redis Cluster a transaction may only touch one hash slot, and a connection has one
WATCH at a time, so the batch is split by slot (every user's hash has its `{user}` hash
tag) and each slot group is one Lua script call (WRITE_USERS) that checks that no user's
state changed since it was read (SHA-1 of what was read against what is there now) and
writes its users: three commands a user (HGET, HSET, PEXPIRE). All groups of a node go
in one pipeline on that node's connection (`_send`), so a batch costs one round trip per
node, not per slot. Only the groups that lost a race are read and computed again. Every
script declares every key it touches (KEYS), as Redis Cluster requires; the plan travels
as one JSON argument and the binary values as one blob.

`popular` is one key in one slot on a cluster, so it cannot be in the users' scripts. It
is written FIRST there, idempotently per event: POPULAR_ADD records each applied event
(`<user>:<event id>`) in a zset in the popular key's slot
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
The one case left inexact on a cluster needs two consumers on one user at once (which
KeyShared and Failover subscriptions rule out): an event counted into popular by a
consumer whose users' write then loses the race, and which its recomputation finds late
because the other consumer moved the user's horizon past it without applying it, stays
counted.

A store of layout v1 is upgraded as `feature_keys` describes: a user without a v2 hash
is read from their v1 keys (only while the store holds a v1 `popular`, checked once at
the first batch, so a v2 store pays nothing), and the first batch copies the v1 popular
scores and honours the v1 record of counted events (`_upgrade`).

Redis errors are not handled here: the job retries the whole batch (every step above
is safe to repeat). A reply the store cannot parse is raised as a `redis.ConnectionError`
(the connection it came on is closed), so that the job retries too.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import hiredis
import orjson
import redis
from redis._parsers.base import BaseParser
from redis.cluster import RedisCluster
from redis.crc import key_slot

from recsys_contracts import feature_keys as keys
from recsys_contracts.events import Event
from stream_jobs.item_embeddings import ItemEmbeddings
from stream_jobs.user_features import (
    FeatureParams,
    Outcome,
    UnreadableState,
    UserState,
    UserUpdate,
    decode_state,
    encode_state,
    popular_weight,
    reader_field_values,
    unreadable_update,
    update_users,
)

MAX_CONFLICT_RETRIES = 20
WRITTEN_CACHE_USERS = 20_000
"""Users whose last write a store remembers (`Written`): 0.3-3 KB each (the state and
the recent items)."""
POPULAR_REDO_WINDOW_MS = 24 * 3_600_000
"""How long the popular record keeps an event whose users' write never confirmed it (a
crash): a redelivery within this window is not counted twice."""
TRANSACTION_USERS = 32
"""Users one transaction holds at most on a single primary. Redis 7.0's WATCH compares
each key with every key the connection already watches (500 keys in one WATCH cost it
4 µs a key), so a batch's users go in transactions of this many, each on its own
connection, all in flight at once (one round trip per step for the whole batch)."""
TRANSACTION_CONNECTIONS = 16
"""Connections a store holds for its transactions at most (single primary): a batch of
more than this many transactions goes in waves of this many. They come from the client's
pool, which the job's other commands share and which holds 100 connections by default,
while a batch may hold 10,000 users (313 transactions)."""
TTL_RENEWAL = 64
"""A write renews a user's TTL (PEXPIRE) unless this process set it less than
1/TTL_RENEWAL of the TTL ago (`Written`): a hash expires between 63/64 of the TTL and the
TTL after the user's last event, and steady writes save a command a user."""
_NOTHING_SHA1 = hashlib.sha1(b"").hexdigest()
_STATE_FIELD = keys.STATE_FIELD.encode()  # the user hash's fields as the writes name them
_FEATURES_FIELD = keys.FEATURES_FIELD.encode()
_RECENT_FIELD = keys.RECENT_FIELD.encode()
_UPGRADE_CHUNK = 1000

# KEYS: the users' hashes, all in one slot. ARGV[1]: TTL in ms. ARGV[2]: the JSON plan,
# per user (in KEYS order) [SHA-1 of the state as read, [field, value, ...] of text,
# [[field, offset, length], ...] of binary values in ARGV[3], 1 to renew the TTL,
# [field, ...] to delete (embeddings of versions no longer served)];
# ARGV[3]: the binary
# values back to back, outside the JSON so that they are neither escaped nor decoded.
# Returns 0, writing nothing, when a state changed since it was read; else 1.
WRITE_USERS = """
local ttl = ARGV[1]
local plan = cjson.decode(ARGV[2])
local blob = ARGV[3]
for i, user in ipairs(plan) do
  if redis.sha1hex(redis.call('HGET', KEYS[i], 'state') or '') ~= user[1] then
    return 0
  end
end
local CHUNK = 2000
for i, user in ipairs(plan) do
  local args = user[2]
  for _, span in ipairs(user[3]) do
    args[#args + 1] = span[1]
    args[#args + 1] = string.sub(blob, span[2] + 1, span[2] + span[3])
  end
  for first = 1, #args, CHUNK do
    redis.call('HSET', KEYS[i], unpack(args, first, math.min(first + CHUNK - 1, #args)))
  end
  if #user[5] > 0 then
    redis.call('HDEL', KEYS[i], unpack(user[5]))
  end
  if user[4] == 1 then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
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


# KEYS[1]: layout v1's popular zset; KEYS[2]: v1's record of counted events (same slot).
# ARGV[1]: the oldest record time (ms) to return. Returns {whether either exists, popular
# as member, score, ..., the record from ARGV[1] as member, time, ...}, read at one
# instant: an event a v1 job counts is in both or in neither.
V1_POPULAR_READ = """
return {
  redis.call('EXISTS', KEYS[1], KEYS[2]),
  redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'),
  redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], '+inf', 'WITHSCORES')
}
"""


class Written(NamedTuple):
    """What this process last wrote for a user. While the user's state is still the one
    it wrote (a read finds `state`), their hash holds `recent` and the TTL this process
    set at `renewed`: they are written with the state, in one transaction. So the next
    write sends `recent` only when it changed, and renews the TTL only when it has aged
    (`TTL_RENEWAL`). Any other writer (another consumer, a rebuild, an expiry) changes
    the state, and the write is whole again."""

    state: bytes
    recent: str
    renewed: float
    """When (`time.monotonic`) this process last set the hash's TTL."""


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


@dataclass
class UsersRead:
    """What a read found for users (in the order asked)."""

    states: list[bytes | None]
    """The states to compute from (from v1 keys for a user without a v2 hash yet)."""
    embeddings: dict[str, list[bytes | None]]
    """model version -> each user's stored embedding (None: none)."""
    embedding_versions: list[bytes | None]
    """Each user's `embedding-versions` field: the versions their hash holds an
    embedding of (None: no such field)."""
    carried: dict[int, list[bytes]] = field(default_factory=dict)
    """index of a user upgraded from v1 -> fields to write with them (seen items,
    embeddings), name and value one after the other, written before the batch's own
    (so that an embedding the batch moved wins)."""
    in_hash: list[bytes | None] = field(default_factory=list)
    """The `state` fields the users' hashes held: what a write checks is still there."""
    problems: dict[int, str] = field(default_factory=dict)
    """index of a user whose key is not a hash of this job's (another writer's) -> why:
    their events are not applied (`Outcome.UNREADABLE_STATE`) and their key not written."""

    def __post_init__(self) -> None:
        self.in_hash = list(self.states)

    @classmethod
    def of_replies(
        cls, users: Sequence[str], replies: Sequence[Any], versions: list[str]
    ) -> UsersRead:
        """The users' HMGET replies (state, embedding-versions, one embedding a version)
        as a read. A WRONGTYPE reply (the key holds no hash) makes that user a problem,
        not the batch an error; any other error is raised (the job retries the batch)."""
        nothing: list[Any] = [None] * (2 + len(versions))
        rows, problems = [], {}
        for n, reply in enumerate(replies):
            if isinstance(reply, redis.ResponseError) and str(reply).startswith("WRONGTYPE"):
                problems[n] = f"the key of user {users[n]!r} holds no hash (another writer's)"
                reply = nothing
            elif isinstance(reply, Exception):
                raise reply
            rows.append(reply)
        read = cls(
            [row[0] for row in rows],
            {v: [row[2 + j] for row in rows] for j, v in enumerate(versions)},
            [row[1] for row in rows],
        )
        read.problems = problems
        return read


class FeatureStore:
    def __init__(self, client: StoreClient, layout: StoreLayout, params: FeatureParams) -> None:
        self.client = client
        self.layout = layout
        self.params = params
        self._cluster = isinstance(client, RedisCluster)
        self._loaded: dict[str, str] = {}  # script text -> SHA-1 the server knows it by
        self._popular_done: list[str] = []  # events whose users' write committed
        self._written: OrderedDict[str, Written] = OrderedDict()  # oldest write first
        self._connections: list[_Replies] = []  # single node: its transactions' connections
        self._versions_encoded: dict[tuple[str, ...], bytes] = {}  # `embedding-versions`
        self._upgrade_checked = False
        self._v1_store = False  # the store held v1 data at the first batch
        self._counted_by_v1: set[str] = set()  # single node: the v1 record's events
        system = layout.system
        self._popular_key = keys.popular_items_key(system).encode()
        self._ttl = str(layout.ttl_ms).encode()
        self._renewal_s = layout.ttl_ms / 1000 / TTL_RENEWAL

    def apply(
        self, events_by_user: Mapping[str, Sequence[Event]], items: Mapping[str, ItemEmbeddings]
    ) -> BatchWrite:
        """Apply each user's events (in order) and write what changed, atomically per slot."""
        if not events_by_user:
            return BatchWrite(events_by_user, {}, time.time() * 1000)
        if not self._upgrade_checked:
            self._upgrade()
        if self._cluster:
            return self._apply_per_slot(events_by_user, items)
        return self._apply_in_transactions(events_by_user, items)

    # --- a single primary: WATCH-guarded transactions -------------------------------

    def _apply_in_transactions(
        self, events_by_user: Mapping[str, Sequence[Event]], items: Mapping[str, ItemEmbeddings]
    ) -> BatchWrite:
        users = list(events_by_user)
        transactions = [
            users[n : n + TRANSACTION_USERS] for n in range(0, len(users), TRANSACTION_USERS)
        ]
        updates: dict[str, UserUpdate] = {}
        for first in range(0, len(transactions), TRANSACTION_CONNECTIONS):
            wave = transactions[first : first + TRANSACTION_CONNECTIONS]
            self._write_wave(wave, events_by_user, items, updates)
        return BatchWrite(events_by_user, updates, time.time() * 1000)

    def _write_wave(
        self,
        pending: list[list[str]],
        events_by_user: Mapping[str, Sequence[Event]],
        items: Mapping[str, ItemEmbeddings],
        updates: dict[str, UserUpdate],
    ) -> None:
        """Write transactions (at most TRANSACTION_CONNECTIONS), each on its own
        connection, until none loses a race; adds what they did to `updates`."""
        versions = list(items)
        system = self.layout.system
        fetch = [keys.STATE_FIELD.encode(), keys.EMBEDDING_VERSIONS_FIELD.encode()]
        fetch += [keys.embedding_field(v).encode() for v in versions]
        for _ in range(MAX_CONFLICT_RETRIES):
            names = [[keys.user_key(system, u).encode() for u in chunk] for chunk in pending]
            try:
                connections = self._transaction_connections(len(pending))
                replies = _exchange(
                    connections,
                    [
                        [(b"WATCH", *chunk), *((b"HMGET", name, *fetch) for name in chunk)]
                        for chunk in names
                    ],
                )
                _raise_any([chunk[:1] for chunk in replies])  # WATCH
                flat = [user for chunk in pending for user in chunk]
                read = UsersRead.of_replies(
                    flat, [reply for chunk in replies for reply in chunk[1:]], versions
                )
                if self._v1_store:
                    self._read_v1(flat, versions, read, connections[0])
                fresh = self._compute(flat, read, events_by_user, items)
                updates.update(fresh)
                commits, remembered = [], []
                offset = 0
                for chunk, chunk_names in zip(pending, names, strict=True):
                    commands, left = self._transaction(
                        chunk, chunk_names, offset, events_by_user, fresh, read
                    )
                    commits.append(commands)
                    remembered.append(left)
                    offset += len(chunk)
                results = _exchange(connections, commits)
                _raise_any([result[:-1] for result in results])  # MULTI, QUEUED...
            except BaseException:
                self._drop_connections()
                raise
            lost = []
            for chunk, result, left in zip(pending, results, remembered, strict=True):
                outcome = result[-1]
                if outcome is None:
                    lost.append(chunk)  # a watched hash changed: nothing of it was written
                    continue
                _raise_any([outcome if isinstance(outcome, list) else [outcome]])
                self._remember(left)
            if not lost:
                return
            pending = lost
        raise TooManyConflicts(
            f"{sum(map(len, pending))} users changed by another writer {MAX_CONFLICT_RETRIES} times"
        )

    def _transaction(
        self,
        users: list[str],
        names: list[bytes],
        offset: int,
        events_by_user: Mapping[str, Sequence[Event]],
        updates: Mapping[str, UserUpdate],
        read: UsersRead,
    ) -> tuple[list[tuple[bytes, ...]], list[tuple[str, Written]]]:
        """MULTI, the changed users' hashes and their popular counts, EXEC (or UNWATCH,
        when no user changed); and what the users' hashes then hold."""
        commands: list[tuple[bytes, ...]] = [(b"MULTI",)]
        written: list[tuple[str, Written]] = []
        sums: dict[str, float] = {}
        half_life = self.layout.popular_half_life_ms
        skip = self._counted_by_v1
        for n, (user, name) in enumerate(zip(users, names, strict=True), start=offset):
            update = updates[user]
            if not update.changed:
                continue  # only duplicates or late events: nothing to write
            fields, remembered, renew = self._user_fields(user, update, read.in_hash[n])
            versions_field, stale = self._embedding_changes(n, update, read)
            fields += versions_field
            commands.append((b"HSET", name, *read.carried.get(n, ()), *fields))  # later wins
            if stale:
                commands.append((b"HDEL", name, *stale))
            if renew:
                commands.append((b"PEXPIRE", name, self._ttl))
            written.append((user, remembered))
            for event, outcome in zip(events_by_user[user], update.outcomes, strict=True):
                if outcome is Outcome.APPLIED and event.is_interaction:
                    if skip and _event_member(user, event.event_id) in skip:
                        continue  # a v1 job counted it before the upgrade
                    weight = popular_weight(event.ts, keys.POPULAR_EPOCH_MS, half_life)
                    sums[event.item_id] = sums.get(event.item_id, 0.0) + weight
        if len(commands) == 1:
            return [(b"UNWATCH",)], written
        for item, weight in sums.items():
            commands.append((b"ZINCRBY", self._popular_key, repr(weight).encode(), item.encode()))
        if sums:
            commands.append((b"PEXPIRE", self._popular_key, self._ttl))
        commands.append((b"EXEC",))
        return commands, written

    def _transaction_connections(self, count: int) -> list[_Replies]:
        """`count` (at most TRANSACTION_CONNECTIONS) connections for transactions (a
        WATCH holds per connection), kept from batch to batch with what each has read."""
        pool = self.client.connection_pool  # type: ignore[union-attr]
        while len(self._connections) < count:
            self._connections.append(_Replies(pool.get_connection()))
        return self._connections[:count]

    def _drop_connections(self) -> None:
        """After an error a connection may hold unread replies or a WATCH: close them,
        and give them back to the pool."""
        pool = self.client.connection_pool  # type: ignore[union-attr]
        readers, self._connections = self._connections, []
        for reader in readers:
            try:
                reader.connection.disconnect()
            finally:
                pool.release(reader.connection)

    # --- a cluster: one script call a slot group -------------------------------------

    def _apply_per_slot(
        self, events_by_user: Mapping[str, Sequence[Event]], items: Mapping[str, ItemEmbeddings]
    ) -> BatchWrite:
        versions = list(items)
        updates: dict[str, UserUpdate] = {}
        counted: list[str] = []  # events sent to POPULAR_ADD in this batch
        pending = self._slot_groups(list(events_by_user))
        for _ in range(MAX_CONFLICT_RETRIES):
            users = [user for group in pending for user in group]
            read = self._read(users, versions)
            fresh = self._compute(users, read, events_by_user, items)
            updates.update(fresh)
            counted += self._add_popular(events_by_user, fresh)
            index = {user: n for n, user in enumerate(users)}
            pending = self._write(pending, fresh, read, index)
            if not pending:
                self._popular_done = list(dict.fromkeys(counted))  # sent with the next POPULAR_ADD
                return BatchWrite(events_by_user, updates, time.time() * 1000)
        raise TooManyConflicts(
            f"{sum(map(len, pending))} users changed by another writer {MAX_CONFLICT_RETRIES} times"
        )

    def _slot_groups(self, users: list[str]) -> list[list[str]]:
        """The users split by the hash slot of their hash."""
        groups: dict[int, list[str]] = {}
        for user in users:
            slot = key_slot(keys.user_key(self.layout.system, user).encode())
            groups.setdefault(slot, []).append(user)
        return list(groups.values())

    def _read(self, users: list[str], versions: list[str]) -> UsersRead:
        """Every user's state and embeddings, one HMGET a user, pipelined per node."""
        system = self.layout.system
        fetch = [keys.STATE_FIELD, keys.EMBEDDING_VERSIONS_FIELD]
        fetch += [keys.embedding_field(v) for v in versions]
        reads: list[Command] = []
        for user in users:
            name = keys.user_key(system, user)
            reads.append((name, ("HMGET", name, *fetch)))
        read = UsersRead.of_replies(users, self._send(reads), versions)
        if self._v1_store:
            self._read_v1(users, versions, read, None)
        return read

    def _write(
        self,
        groups: list[list[str]],
        updates: dict[str, UserUpdate],
        read: UsersRead,
        index: Mapping[str, int],
    ) -> list[list[str]]:
        """Write each group's changed users; returns the groups that lost the race to
        another writer (nothing of theirs was written)."""
        calls: list[ScriptCall] = []
        written: list[tuple[list[str], list[tuple[str, Written]]]] = []
        system = self.layout.system
        for group in groups:
            plan: list[Any] = []
            blob: list[bytes] = []
            offset = 0
            group_keys: list[str] = []
            left: list[tuple[str, Written]] = []
            for user in group:
                update = updates[user]
                if not update.changed:
                    continue  # only duplicates or late events: nothing to write
                n = index[user]
                state_read = read.in_hash[n]
                fields, remembered, renew = self._user_fields(user, update, state_read)
                versions_field, stale_fields = self._embedding_changes(n, update, read)
                fields += versions_field
                fields = [*read.carried.get(n, ()), *fields]  # the later value wins
                text: list[str] = []
                spans: list[tuple[str, int, int]] = []
                for name, value in zip(fields[::2], fields[1::2], strict=True):
                    if name == _STATE_FIELD or name.startswith(b"emb:"):
                        spans.append((name.decode(), offset, len(value)))
                        blob.append(value)
                        offset += len(value)
                    else:
                        text += (name.decode(), value.decode())
                sha = hashlib.sha1(state_read).hexdigest() if state_read else _NOTHING_SHA1
                stale = [name.decode() for name in stale_fields]
                plan.append((sha, text, spans, int(renew), stale))
                group_keys.append(keys.user_key(system, user))
                left.append((user, remembered))
            if plan:
                args = (self.layout.ttl_ms, orjson.dumps(plan), b"".join(blob))
                calls.append(ScriptCall(group_keys, args))
                written.append((group, left))
        results = self._run(WRITE_USERS, calls)
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
            (self.layout.ttl_ms, POPULAR_REDO_WINDOW_MS, orjson.dumps(plan)),
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
        safe: it was not run, or it is a read, or a WRITE_USERS finds its states changed,
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

    # --- both: computing, the user's fields, the upgrade from v1 ---------------------

    def _compute(
        self,
        users: list[str],
        read: UsersRead,
        events_by_user: Mapping[str, Sequence[Event]],
        items: Mapping[str, ItemEmbeddings],
    ) -> dict[str, UserUpdate]:
        unreadable = dict(read.problems)
        try:  # the steady case: every state reads
            states = [] if unreadable else [decode_state(v, self.params) for v in read.states]
        except UnreadableState:
            states = []
        if not states and read.states:
            states = self._decode_or_stand_in(users, read.states, unreadable)
        batch = update_users(
            states, read.embeddings, [events_by_user[u] for u in users], self.params, items
        )
        for n, problem in unreadable.items():
            batch[n] = unreadable_update(events_by_user[users[n]], problem)
        return dict(zip(users, batch, strict=True))

    def _decode_or_stand_in(
        self, users: list[str], values: list[bytes | None], unreadable: dict[int, str]
    ) -> list[UserState]:
        """The states read, a fresh one standing in for each user in `unreadable` and for
        each state that does not decode (added to `unreadable`, with why): their events
        are dead-lettered (`Outcome.UNREADABLE_STATE`) and their hash is left as it is."""
        states = []
        for n, value in enumerate(values):
            if n in unreadable:
                states.append(UserState())
                continue
            try:
                states.append(decode_state(value, self.params))
            except UnreadableState as exc:
                states.append(UserState())
                unreadable[n] = f"the stored state of user {users[n]!r} cannot be read: {exc}"
        return states

    def _user_fields(
        self, user: str, update: UserUpdate, state_read: bytes | None
    ) -> tuple[list[bytes], Written, bool]:
        """The fields to HSET for a changed user (name, value, ...), what their hash will
        hold once the write committed, and whether the write renews the TTL (see
        TTL_RENEWAL)."""
        state = encode_state(update.state)
        clock = time.monotonic()
        renewed = clock
        field_values, recent_list = reader_field_values(update.state, self.params)
        recent = keys.encode_recent(recent_list)
        features = keys.encode_features(
            dict(zip(self.params.field_names, field_values, strict=True))
        )
        fields: list[bytes] = [_STATE_FIELD, state, _FEATURES_FIELD, features]
        before = self._written.get(user)
        if before is not None and state_read == before.state:  # the hash holds `before`
            if clock - before.renewed < self._renewal_s:
                renewed = before.renewed  # its TTL is still (nearly) whole
            if recent != before.recent:
                fields += (_RECENT_FIELD, recent.encode())
        else:
            fields += (_RECENT_FIELD, recent.encode())
        for version, vector in update.embeddings.items():
            fields += (keys.embedding_field(version).encode(), keys.encode_embedding(vector))
        for item in sorted({item_id for item_id, _ in update.touched_items}):
            fields += (keys.seen_field(item).encode(), b"1")
        return fields, Written(state, recent, renewed), renewed == clock

    def _embedding_changes(
        self, n: int, update: UserUpdate, read: UsersRead
    ) -> tuple[list[bytes], list[bytes]]:
        """For the `n`th user read: the `embedding-versions` field to write (name and
        value; nothing when it stays as it is) and the embedding fields of model versions
        no longer among the job's (`items`) to delete. The read tells which versions the
        hash holds, so this costs nothing in the steady case and a command only when a
        version went. (A hash written before `embedding-versions` existed keeps its old
        embeddings until it expires.)"""
        after = tuple(
            v
            for v, stored in read.embeddings.items()
            if stored[n] is not None or v in update.embeddings
        )
        encoded = self._versions_encoded.get(after)
        if encoded is None:
            encoded = self._versions_encoded[after] = orjson.dumps(sorted(after))
        held_field = read.embedding_versions[n]
        if held_field == encoded:
            return [], []  # the steady case
        held = _versions(held_field)
        stale = [keys.embedding_field(v).encode() for v in sorted(held - set(read.embeddings))]
        if held == set(after):
            return [], stale
        return [keys.EMBEDDING_VERSIONS_FIELD.encode(), encoded], stale

    def _upgrade(self) -> None:
        """At the first batch: does the store hold v1 data? Then copy v1's popular scores
        into v2's (members it does not hold yet: a copy by another job, or a count already
        made into v2, is not overwritten) and honour v1's record of counted events. Both
        are read in one script: an event counted between two reads would be in the record
        and not in the copy, counted nowhere. (No v1 job may still write then: see
        `feature_keys`.)"""
        system = self.layout.system
        v1_popular = keys.popular_items_key(system, "v1")
        v1_record = keys.popular_applied_key(system, "v1")
        now_ms = int(time.time() * 1000)
        call = ScriptCall([v1_popular, v1_record], (now_ms - POPULAR_REDO_WINDOW_MS,))
        ((exists, flat_scores, flat_record),) = self._run(V1_POPULAR_READ, [call])
        self._v1_store = exists > 0
        if self._v1_store:
            popular: Any = keys.popular_items_key(system)
            scores: Any = _pairs(flat_scores)
            for first in range(0, len(scores), _UPGRADE_CHUNK):
                chunk = scores[first : first + _UPGRADE_CHUNK]
                self.client.zadd(popular, dict(chunk), nx=True)
            if scores:
                self.client.pexpire(popular, self.layout.ttl_ms)
            record: Any = _pairs(flat_record)
            if self._cluster and record:  # POPULAR_ADD consults v2's record
                v2_record: Any = keys.popular_applied_key(system)
                for first in range(0, len(record), _UPGRADE_CHUNK):
                    self.client.zadd(
                        v2_record, dict(record[first : first + _UPGRADE_CHUNK]), nx=True
                    )
                self.client.pexpire(v2_record, POPULAR_REDO_WINDOW_MS)
            else:
                self._counted_by_v1 = {member.decode() for member, _ in record}
        self._upgrade_checked = True

    def _read_v1(
        self, users: list[str], versions: list[str], read: UsersRead, connection: Any
    ) -> None:
        """Fill in, from their v1 keys, the users a read found no v2 hash for."""
        system = self.layout.system
        missing = [n for n, state in enumerate(read.states) if state is None]
        if not missing:
            return
        per_user = 2 + len(versions)
        commands: list[Command] = []
        for n in missing:
            state_key = keys.v1_state_key(system, users[n])
            commands.append((state_key, ("GET", state_key)))
            commands.append((state_key, ("SMEMBERS", keys.v1_seen_items_key(system, users[n]))))
            for version in versions:
                commands.append(
                    (state_key, ("GET", keys.v1_embedding_key(system, users[n], version)))
                )
        if connection is not None:
            replies = _exchange(
                [connection], [[tuple(_bytes(a) for a in args) for _, args in commands]]
            )[0]
        else:
            replies = self._send(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        for m, n in enumerate(missing):
            state, seen, *embeddings = replies[per_user * m : per_user * (m + 1)]
            if state is None:
                continue  # a new user
            read.states[n] = state
            carried: list[bytes] = []
            for item in sorted(seen or ()):
                carried += (keys.SEEN_PREFIX.encode() + item, b"1")
            for version, data in zip(versions, embeddings, strict=True):
                if data is not None:
                    read.embeddings[version][n] = data
                    carried += (keys.embedding_field(version).encode(), data)
            read.carried[n] = carried

    def _remember(self, written: Sequence[tuple[str, Written]]) -> None:
        """Keep what a committed write left, for the newest WRITTEN_CACHE_USERS users."""
        cache = self._written
        for user, entry in written:
            cache[user] = entry
            cache.move_to_end(user)
        while len(cache) > WRITTEN_CACHE_USERS:
            cache.popitem(last=False)


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


def _exchange(
    connections: Sequence[_Replies], commands: Sequence[Sequence[tuple[bytes, ...]]]
) -> list[list[Any]]:
    """Each connection's commands sent in one write, all connections first, then their
    replies (in order), errors in their place (`_Replies`). The commands are packed and
    the replies parsed by hiredis (C) here, not through redis-py's connection: its
    encoder and reply callbacks cost one to two microseconds of Python an argument and a
    reply, and a batch has tens of thousands."""
    for reader, batch in zip(connections, commands, strict=True):
        # no health check: its PING would be read by redis-py's parser, past bytes this
        # store may still hold (`_Replies`); a dead connection fails the read instead
        # (hiredis's stub types its argument as a tuple of one element)
        packed = b"".join([hiredis.pack_command(command) for command in batch])  # type: ignore[arg-type]
        reader.connection.send_packed_command([packed], check_health=False)
    return [reader.read(len(batch)) for reader, batch in zip(connections, commands, strict=True)]


def _raise_any(replies: Sequence[Sequence[Any]]) -> None:
    """Raise the first error among replies (the job retries the batch)."""
    for batch in replies:
        for reply in batch:
            if isinstance(reply, Exception):
                raise reply


class _Replies:
    """Replies read straight off a redis-py connection's socket (RESP2 or RESP3) by
    hiredis's reader, which nothing else reads meanwhile: the store owns its transaction
    connections, and redis-py's own parser holds no bytes once their handshake was read.
    What a read received past the replies it wanted (a RESP3 push message, whole or in
    part) stays in the reader for the next read of the same connection. (hiredis reads
    every type Redis sends; RESP3's attribute type, which no Redis command sends, it
    would return as a reply of its own.)"""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self._reader = _reader()
        self._socket: Any = None  # the socket `_reader` was fed from

    def read(self, count: int) -> list[Any]:
        """The next `count` replies (push messages skipped). A reply that is no RESP
        raises a `redis.ConnectionError`: the connection is out of step, and the job
        retries on a fresh one."""
        socket = self.connection._sock  # see the class docstring
        if socket is None:
            raise redis.ConnectionError("the feature store connection is closed")
        if socket is not self._socket:  # (re)connected: nothing is left of the old one
            self._socket, self._reader = socket, _reader()
        try:
            return self._read(count)
        except (hiredis.ProtocolError, TypeError) as exc:  # TypeError: a map keyed by a list
            self._reader = _reader()  # what it holds is out of step too
            raise redis.ConnectionError(f"unreadable reply from the feature store: {exc}") from exc

    def _read(self, count: int) -> list[Any]:
        replies: list[Any] = []
        reader = self._reader
        while len(replies) < count:
            reply = reader.gets()
            if reply is _MORE:
                self._receive()
            elif type(reply) is not hiredis.PushNotification:  # a push message is no reply
                replies.append(reply)
        return replies

    def _receive(self) -> None:
        try:
            data = self._socket.recv(1 << 20)
        except TimeoutError as exc:
            raise redis.TimeoutError("timed out reading from the feature store") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"reading from the feature store: {exc}") from exc
        if not data:
            raise redis.ConnectionError("the feature store closed the connection")
        self._reader.feed(data)


_MORE = object()
"""What the reader returns while it holds no whole reply (`False` is a RESP3 reply)."""


def _reader() -> hiredis.Reader:
    """A RESP reader whose error replies are redis-py's exceptions, as redis-py raises."""
    return hiredis.Reader(replyError=BaseParser.parse_error, notEnoughData=_MORE)


def _pairs(flat: Sequence[bytes]) -> list[tuple[bytes, float]]:
    """A zset's members and scores as a script returns them: member, score, ..."""
    return [(member, float(score)) for member, score in zip(flat[::2], flat[1::2], strict=True)]


def _versions(field_value: bytes | None) -> set[str]:
    """The model versions in an `embedding-versions` field (a JSON list)."""
    if not field_value:
        return set()
    try:
        versions = orjson.loads(field_value)
    except orjson.JSONDecodeError:
        return set()  # not this job's: the next write sets it again
    return {v for v in versions if isinstance(v, str)} if isinstance(versions, list) else set()


def _bytes(value: bytes | str | int) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def _event_member(user_id: str, event_id: str) -> str:
    """An event in the popular record: event ids are unique per user (length-prefixed,
    so no user id and event id pair reads as another)."""
    return f"{len(user_id)}:{user_id}:{event_id}"
