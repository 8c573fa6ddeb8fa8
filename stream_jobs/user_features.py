"""Per-user feature math: pure functions from (state, event) to a new state.

Nothing here does I/O or reads a clock, so replaying the same events gives the
same state, and every rule is testable on its own. Time is *event time*: the
user's clock is the newest `ts` seen for that user, so windows and sessions do
not depend on when the job happens to run or restart.

Rules (see docs/stream-features.md for the reader's view):

- **Event time within an allowed lateness.** The user's *watermark* is their
  clock minus `allowed_lateness_ms`. An event at or after the watermark is applied
  as if it had arrived in order: the state keeps a *settled* part (every event
  before the watermark, folded in (ts, event_id) order) and the *pending* events
  (at or after it, raw); what readers see (`view`) is the settled part with the
  pending events folded on in order. So windows, last-N, recency and sessions equal
  those of the sorted stream, whatever the arrival order within the lateness.
  An event before the watermark (or not after the newest settled one) is LATE: it
  changes nothing, and the job dead-letters it (reason `late`), never silently.
  At most `MAX_PENDING` events wait per user; past that the oldest settle early.
- **Idempotence.** An event whose `event_id` is in the user's seen set changes
  nothing. The set keeps every pending id and the newest `dedup_capacity` settled
  ones, so a redelivered recent event is a DUPLICATE; an older unseen one is
  before the watermark, hence LATE, so a replay never counts twice.
- **Windows.** Counts per type over each window are kept in `buckets_per_window`
  time buckets (a 1h window in 1-minute buckets), so the state is bounded however
  active the user is. A window covers the buckets that end at the bucket of the
  user's newest event; its resolution is window / buckets_per_window.
- **Sessions** are runs of events less than `session_gap_ms` apart; an event more
  than the gap after the previous one starts a new session, named by its event id.
- **Online embedding.** `u <- decay * u + learning_rate * item`, per interaction,
  in arrival order (impressions do not move it).
"""

from __future__ import annotations

import json
import struct
from bisect import insort
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

import msgpack
import numpy as np

from recsys_contracts.events import Event, EventType
from recsys_contracts.feature_job_settings import FeatureJobSettings, duration_ms
from recsys_contracts.feature_keys import count_field
from stream_jobs.item_embeddings import ItemEmbeddings

JSON_STATE_FORMAT = 2
"""Of a JSON state: 2 added the pending events; a format-1 state reads as settled with none
pending. States are now written in a binary form (`encode_state`); JSON ones still load."""
MAX_PENDING = 500
"""Events waiting per user (bounds the state of a very active user)."""
# Made once: json.dumps/loads with options build a new coder per call, which costs
# as much as the coding itself for states this small.
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_DECODER = json.JSONDecoder()
EVENT_TYPE_NAMES = tuple(t.value for t in EventType)
TYPE_INDEX = {name: i for i, name in enumerate(EVENT_TYPE_NAMES)}
_TYPE_VALUES = {t: t.value for t in EventType}


@dataclass(frozen=True)
class FeatureParams:
    """The knobs of the feature math (from the job's settings)."""

    last_n: int = 50
    windows: tuple[tuple[str, int], ...] = (("1h", 3_600_000), ("24h", 86_400_000))
    """(name, length in milliseconds) of each counting window."""
    buckets_per_window: int = 60
    session_gap_ms: int = 30 * 60_000
    dedup_capacity: int = 64
    learning_rate: float = 0.1
    decay: float = 0.98
    allowed_lateness_ms: int = 10 * 60_000
    """How far behind the user's newest event an event may arrive and still be applied
    in its place (see the module docstring)."""

    @classmethod
    def from_settings(cls, settings: FeatureJobSettings) -> FeatureParams:
        return cls(
            last_n=settings.last_n,
            windows=tuple((w, duration_ms(w)) for w in settings.windows),
            session_gap_ms=duration_ms(settings.session_gap),
            dedup_capacity=settings.dedup_capacity,
            learning_rate=settings.learning_rate,
            decay=settings.decay,
            allowed_lateness_ms=duration_ms(settings.allowed_lateness),
        )

    def bucket_ms(self, window_ms: int) -> int:
        return max(1, window_ms // self.buckets_per_window)

    @cached_property
    def window_buckets(self) -> tuple[tuple[str, int], ...]:
        """(name, bucket width in ms) of each window."""
        return tuple((name, self.bucket_ms(window_ms)) for name, window_ms in self.windows)

    @cached_property
    def window_names(self) -> frozenset[str]:
        """The names of the windows, for a decoded state to keep only those."""
        return frozenset(name for name, _ in self.windows)

    @cached_property
    def count_fields(self) -> tuple[tuple[str, ...], ...]:
        """Per window, the `features` field of each event type's count."""
        return tuple(
            tuple(count_field(t, name) for t in EVENT_TYPE_NAMES) for name, _ in self.windows
        )

    @cached_property
    def field_names(self) -> tuple[str, ...]:
        """Every field of the `features` hash, in the order `reader_values` makes them."""
        return (*(f for names in self.count_fields for f in names), *SCALAR_FIELDS)


PendingEvent = tuple[int, str, str, str, int | None]
"""(ts, event id, type, item id, dwell ms) of an event after the watermark, not folded yet."""

RecentItem = tuple[int, str]
"""(ts, item id) of one interaction."""

Counts = Mapping[str, Mapping[int, tuple[int, ...]]]
"""window name -> bucket index -> count per event type (in EVENT_TYPE_NAMES order)."""


@dataclass(frozen=True)
class UserState:
    """Everything the job remembers about one user (stored under `state`: `encode_state`).

    The fields up to `events_applied` are the *settled* part: the fold of the events
    before the watermark. `pending` holds the rest; `view` folds them on.
    """

    last_ts: int | None = None
    """The newest event time folded in (in a view: the user's newest event time)."""
    previous_gap_ms: int | None = None
    """Time between the two newest events."""
    recent: tuple[RecentItem, ...] = ()
    """Items of the newest interactions, newest first, at most last_n."""
    counts: Counts = field(default_factory=dict)
    dwell_total_ms: int = 0
    dwell_events: int = 0
    session_id: str | None = None
    session_start_ts: int | None = None
    session_events: int = 0
    seen: Mapping[str, int] = field(default_factory=dict)
    """event_id -> ts of the newest dedup_capacity events applied."""
    events_applied: int = 0
    pending: tuple[PendingEvent, ...] = ()
    """Events at or after the watermark, sorted by (ts, event id)."""
    clock_ts: int | None = None
    """The user's clock: the newest event time seen (settled or pending)."""


def _with(state: UserState, **changes: Any) -> UserState:
    """`dataclasses.replace` for UserState, without its per-call field introspection
    (which cost more than the rest of applying an event). UserState is frozen, so
    the new instance's attributes are set through its __dict__ once, here."""
    updated = object.__new__(UserState)
    attributes = updated.__dict__
    attributes.update(state.__dict__)
    attributes.update(changes)
    return updated


_FRESH = UserState()


class Outcome(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    LATE = "late"
    UNREADABLE_STATE = "unreadable_state"
    """The user's stored state cannot be decoded (`UnreadableState`): nothing applied."""


def watermark(state: UserState, params: FeatureParams) -> int | None:
    """Events before this time are too late to be applied in their place."""
    if state.clock_ts is None:
        return None
    return state.clock_ts - params.allowed_lateness_ms


def classify(state: UserState, event: Event, params: FeatureParams) -> Outcome:
    """Whether `event` is new to `state`, a duplicate, or too late to apply in its place."""
    if event.event_id in state.seen:
        return Outcome.DUPLICATE
    mark = watermark(state, params)
    if mark is not None and event.ts < mark:
        return Outcome.LATE
    if state.last_ts is not None and event.ts <= state.last_ts:
        return Outcome.LATE  # before an event that settled early (MAX_PENDING)
    return Outcome.APPLIED


def apply_event(state: UserState, event: Event, params: FeatureParams) -> tuple[UserState, Outcome]:
    """The state after `event`, and what happened to it (only APPLIED changes the state)."""
    outcome = classify(state, event, params)
    if outcome is not Outcome.APPLIED:
        return state, outcome
    fact: PendingEvent = (event.ts, event.event_id, event.type.value, event.item_id, event.dwell_ms)
    pending = state.pending
    if not pending or fact >= pending[-1]:  # the common case: in order
        pending = (*pending, fact)
    else:
        pending = tuple(sorted((*pending, fact)))
    clock = event.ts if state.clock_ts is None else max(state.clock_ts, event.ts)
    mark = clock - params.allowed_lateness_ms
    ready = 0
    while ready < len(pending) and (pending[ready][0] < mark or len(pending) - ready > MAX_PENDING):
        ready += 1
    settled = _fold(state, pending[:ready], params)
    seen = _remember(settled.seen, event.event_id, event.ts, settled.last_ts, params.dedup_capacity)
    return _with(settled, seen=seen, pending=pending[ready:], clock_ts=clock), Outcome.APPLIED


def view(state: UserState, params: FeatureParams) -> UserState:
    """What readers see: the settled part with the pending events folded on in order."""
    if not state.pending:
        return state
    return _fold(state, state.pending, params, pending=())


def _fold(
    state: UserState, facts: Sequence[PendingEvent], params: FeatureParams, **also: Any
) -> UserState:
    """`state` with `facts` folded in, in order (and the fields in `also` set); none is
    older than any folded so far.

    One pass: counts are added first and trimmed once to the windows of the final
    clock, which is what trimming after each event gives (the clock only grows)."""
    if not facts:
        return _with(state, **also) if also else state
    scalars, recent, added = _fold_parts(state, facts, params)
    return _with(
        state,
        **scalars,
        recent=tuple(sorted(recent, reverse=True)[: params.last_n]),
        counts=_add_counts(state.counts, added, scalars["last_ts"], params),
        **also,
    )


def _fold_parts(
    state: UserState, facts: Sequence[PendingEvent], params: FeatureParams
) -> tuple[dict[str, Any], list[RecentItem], list[tuple[int, str]]]:
    """What folding `facts` (at least one) into `state` gives: the new scalar fields, the
    recent items untrimmed and unsorted, and the (ts, type) to count."""
    last_ts, gap = state.last_ts, state.previous_gap_ms
    session_id, session_start, session_events = (
        state.session_id,
        state.session_start_ts,
        state.session_events,
    )
    dwell_total, dwell_events = state.dwell_total_ms, state.dwell_events
    recent = list(state.recent)
    added: list[tuple[int, str]] = []
    for ts, event_id, event_type, item_id, dwell_ms in facts:
        if last_ts is None or session_id is None or ts - last_ts > params.session_gap_ms:
            session_id, session_start, session_events = event_id, ts, 1
        else:
            session_start = ts if session_start is None else min(session_start, ts)
            session_events += 1
        gap = None if last_ts is None else ts - last_ts
        last_ts = ts if last_ts is None else max(last_ts, ts)
        if dwell_ms is not None:
            dwell_total += dwell_ms
            dwell_events += 1
        if event_type != _IMPRESSION:
            recent.append((ts, item_id))
        added.append((ts, event_type))
    scalars = {
        "last_ts": last_ts,
        "previous_gap_ms": gap,
        "dwell_total_ms": dwell_total,
        "dwell_events": dwell_events,
        "session_id": session_id,
        "session_start_ts": session_start,
        "session_events": session_events,
        "events_applied": state.events_applied + len(facts),
    }
    return scalars, recent, added


_IMPRESSION = EventType.IMPRESSION.value


def fold_events(
    state: UserState, events: Iterable[Event], params: FeatureParams
) -> tuple[UserState, list[Outcome]]:
    """`apply_event` over `events` in order."""
    outcomes = []
    for event in events:
        state, outcome = apply_event(state, event, params)
        outcomes.append(outcome)
    return state, outcomes


def _remember(
    seen: Mapping[str, int], event_id: str, ts: int, settled_ts: int | None, capacity: int
) -> dict[str, int]:
    """`seen` with `event_id`, less the oldest settled ids past `capacity` (pending ids,
    newer than every settled one, stay: a redelivered pending event is a duplicate)."""
    updated = dict(seen)
    updated[event_id] = ts
    _prune_seen(updated, settled_ts, capacity)
    return updated


def _prune_seen(seen: dict[str, int], settled_ts: int | None, capacity: int) -> None:
    """Drop from `seen`, in place, the oldest settled ids (ts up to `settled_ts`) past
    `capacity`; none while `seen` holds no more than `capacity` ids or nothing settled."""
    if len(seen) > capacity and settled_ts is not None:
        # Oldest first, ties by id, so the result does not depend on arrival order.
        settled = sorted((t, i) for i, t in seen.items() if t <= settled_ts)
        for _, old_id in settled[: len(settled) - capacity]:
            del seen[old_id]


def _add_counts(
    counts: Counts, added: Sequence[tuple[int, str]], last_ts: int, params: FeatureParams
) -> Counts:
    """`counts` plus one per (ts, type) in `added`, trimmed to the windows ending at the
    bucket of `last_ts`."""
    updated: dict[str, Mapping[int, tuple[int, ...]]] = {}
    for name, width in params.window_buckets:
        oldest = last_ts // width - params.buckets_per_window + 1
        buckets = {b: list(c) for b, c in counts.get(name, {}).items() if b >= oldest}
        for ts, event_type in added:
            bucket = ts // width
            if bucket >= oldest:
                buckets.setdefault(bucket, list(_NO_COUNTS))[TYPE_INDEX[event_type]] += 1
        updated[name] = {b: tuple(c) for b, c in buckets.items()}
    return updated


_NO_COUNTS = (0,) * len(EVENT_TYPE_NAMES)


# --- what readers see ------------------------------------------------------------


def window_totals(state: UserState, params: FeatureParams) -> list[list[int]]:
    """Per window (in params order), the events per type (in EVENT_TYPE_NAMES order)."""
    state = view(state, params)
    result = []
    for name, width in params.window_buckets:
        totals = [0] * len(EVENT_TYPE_NAMES)
        if state.last_ts is not None:
            oldest = state.last_ts // width - params.buckets_per_window + 1
            for bucket, per_type in state.counts.get(name, {}).items():
                if bucket >= oldest:
                    for i, n in enumerate(per_type):
                        totals[i] += n
        result.append(totals)
    return result


def window_counts(state: UserState, params: FeatureParams) -> dict[tuple[str, str], int]:
    """(window, event type) -> events of that type in the window, for every pair."""
    return {
        (name, event_type): n
        for (name, _), totals in zip(params.windows, window_totals(state, params), strict=True)
        for event_type, n in zip(EVENT_TYPE_NAMES, totals, strict=True)
    }


def feature_fields(state: UserState, params: FeatureParams) -> dict[str, str]:
    """The `features` hash of a user: field -> value (all values as strings)."""
    return reader_values(state, params)[0]


def reader_values(state: UserState, params: FeatureParams) -> tuple[dict[str, str], list[str]]:
    """(`feature_fields`, `recent_item_ids`) of `state` in one pass."""
    values, recent = reader_field_values(state, params)
    return dict(zip(params.field_names, values, strict=True)), recent


def _count_text(n: int) -> str:
    return _TEXTS[n] if 0 <= n < _TEXTS_COUNT else str(n)


def reader_field_values(state: UserState, params: FeatureParams) -> tuple[list[str], list[str]]:
    """The values of the `features` hash (in `params.field_names` order) and
    `recent_item_ids` of `state`, in one pass: the pending events are folded on for the
    scalars by `_fold_parts` (the rules `_fold` applies) and counted into the window
    totals directly, without the view's copy of the
    buckets (the same totals: the view trims to the same windows; tested equal)."""
    pending = state.pending
    per_type = [0] * _TYPES  # the pending events per type
    if not pending:
        last_ts, gap = state.last_ts, state.previous_gap_ms
        session_id, start, session_events = (
            state.session_id,
            state.session_start_ts,
            state.session_events,
        )
        dwell_total, dwell_events = state.dwell_total_ms, state.dwell_events
        recent = [item_id for _, item_id in state.recent]
    else:
        scalars, items, added = _fold_parts(state, pending, params)
        last_ts, gap = scalars["last_ts"], scalars["previous_gap_ms"]
        session_id, start, session_events = (
            scalars["session_id"],
            scalars["session_start_ts"],
            scalars["session_events"],
        )
        dwell_total, dwell_events = scalars["dwell_total_ms"], scalars["dwell_events"]
        for _, event_type in added:
            per_type[TYPE_INDEX[event_type]] += 1
        items.sort(reverse=True)
        recent = [item_id for _, item_id in items[: params.last_n]]
    # Counts are small: their texts come from a table (str() of an int cost four times more).
    values: list[str] = []
    span = params.buckets_per_window
    for window, width in params.window_buckets:
        if last_ts is None:  # no event yet
            values += _ZERO_TEXTS
            continue
        oldest = last_ts // width - span + 1  # the window ends at the newest event's bucket
        buckets = state.counts.get(window)
        rows = [c for b, c in buckets.items() if b >= oldest] if buckets else None
        if rows:
            totals = [sum(column) for column in zip(*rows, strict=True)]
            if pending:
                totals = [
                    n + m
                    for n, m in zip(
                        totals, _in_window(pending, width, oldest, per_type), strict=True
                    )
                ]
        elif pending:
            totals = _in_window(pending, width, oldest, per_type)
        else:
            values += _ZERO_TEXTS
            continue
        values += [_TEXTS[n] if 0 <= n < _TEXTS_COUNT else str(n) for n in totals]
    values += (
        "" if last_ts is None else str(last_ts),
        "" if gap is None else str(gap),
        f"{dwell_total / dwell_events:.1f}" if dwell_events else "",
        _count_text(dwell_events),
        session_id or "",
        "" if start is None else str(start),
        _count_text(session_events),
        _count_text(state.events_applied + len(pending)),
    )  # in SCALAR_FIELDS order
    return values, recent


def _in_window(
    pending: Sequence[PendingEvent], width: int, oldest: int, per_type: list[int]
) -> list[int]:
    """The pending events per type in the window whose oldest bucket is `oldest`: all of
    them (`per_type`) when the oldest is in it, as it nearly always is."""
    if pending[0][0] // width >= oldest:  # pending is sorted: its first is its oldest
        return per_type
    counted = [0] * _TYPES
    for ts, _, event_type, _, _ in pending:
        if ts // width >= oldest:
            counted[TYPE_INDEX[event_type]] += 1
    return counted


_TEXTS_COUNT = 1024
_TEXTS = tuple(str(n) for n in range(_TEXTS_COUNT))


SCALAR_FIELDS = (
    "last_ts",
    "previous_gap_ms",
    "dwell_mean_ms",
    "dwell_events",
    "session_id",
    "session_start_ts",
    "session_events",
    "events",
)
_TYPES = len(EVENT_TYPE_NAMES)
_ZERO_TEXTS = ("0",) * _TYPES
_NO_BUCKETS: Mapping[int, tuple[int, ...]] = {}


def recent_item_ids(state: UserState, params: FeatureParams) -> list[str]:
    """The `recent` list of a user, newest first."""
    return reader_values(state, params)[1]


# --- online embedding ------------------------------------------------------------


def update_embedding(
    user: np.ndarray | None, item: np.ndarray, learning_rate: float, decay: float
) -> np.ndarray:
    """The user's embedding after touching `item`: decay the old, add a step toward the item."""
    step = learning_rate * np.asarray(item, dtype=np.float32)
    if user is None:
        return step.astype(np.float32)
    return (decay * user + step).astype(np.float32)


@dataclass(slots=True)
class UserUpdate:
    """What one user's events in a batch did: the new state and embeddings, and why.

    Not frozen: a frozen dataclass sets each field through `object.__setattr__`, which
    cost a microsecond a user; nothing changes one after `update_users` made it."""

    state: UserState
    outcomes: list[Outcome]
    embeddings: dict[str, np.ndarray]
    """model version -> new embedding, only for versions the events moved."""
    touched_items: list[tuple[str, int]]
    """(item id, ts) of the applied interactions, for the popular items."""
    unknown_items: dict[str, int]
    """model version -> interactions with items that version has no embedding for."""
    problem: str | None = None
    """Why nothing was applied, when the outcomes are UNREADABLE_STATE."""

    @property
    def changed(self) -> bool:
        return Outcome.APPLIED in self.outcomes


def update_user(
    state: UserState,
    embeddings: Mapping[str, np.ndarray | None],
    events: Sequence[Event],
    params: FeatureParams,
    items: Mapping[str, ItemEmbeddings],
) -> UserUpdate:
    """Apply one user's `events` (in arrival order) to their state and their embeddings.

    `embeddings` holds the user's current embedding per model version in `items`
    (None when there is none yet); each applied interaction moves every version
    that knows the item.
    """
    current = dict(embeddings)
    moved: dict[str, np.ndarray] = {}
    outcomes: list[Outcome] = []
    touched: list[tuple[str, int]] = []
    unknown: dict[str, int] = {}
    for event in events:
        state, outcome = apply_event(state, event, params)
        outcomes.append(outcome)
        if outcome is not Outcome.APPLIED or not event.is_interaction:
            continue
        touched.append((event.item_id, event.ts))
        for version, catalog in items.items():
            item = catalog.vector(event.item_id)
            if item is None:
                unknown[version] = unknown.get(version, 0) + 1
                continue
            vector = update_embedding(
                current.get(version), item, params.learning_rate, params.decay
            )
            current[version] = moved[version] = vector
    return UserUpdate(state, outcomes, moved, touched, unknown)


def update_users(
    states: Sequence[UserState],
    embeddings: Mapping[str, Sequence[bytes | None]],
    events: Sequence[Sequence[Event]],
    params: FeatureParams,
    items: Mapping[str, ItemEmbeddings],
) -> list[UserUpdate]:
    """`update_user` for a batch of users at once, with the embeddings as stored.

    `embeddings` holds, per model version in `items`, each user's stored embedding
    (little-endian float32; None or another length reads as none yet). The state
    rules run per user; the embedding updates run per version as numpy over all the
    batch's users, one step per interaction position (the n-th applied interaction
    of every user in one operation), so each user's vector goes through the same
    float32 operations in the same order as in `update_user`: the same bits. The state
    rules are `_apply_events`: `apply_event`'s, without a new state per event.
    """
    updates = []
    for state, user_events in zip(states, events, strict=True):
        new_state, outcomes, touched = _apply_events(state, user_events, params)
        updates.append(UserUpdate(new_state, outcomes, {}, touched, {}))
    for version, catalog in items.items():
        _move_embeddings(version, catalog, embeddings[version], updates, params)
    return updates


def _apply_events(
    state: UserState, events: Sequence[Event], params: FeatureParams
) -> tuple[UserState, list[Outcome], list[tuple[str, int]]]:
    """`apply_event` over one user's `events` in order, the state's changing parts held
    in local variables and one `UserState` made at the end (not one an event): the new
    state, the outcomes, and the (item id, ts) of the applied
    interactions. The same rules, step by step, as `apply_event` (tested equal on
    random streams: the same outcomes and the same state, down to its bytes)."""
    applied, duplicate, late = Outcome.APPLIED, Outcome.DUPLICATE, Outcome.LATE
    lateness, capacity = params.allowed_lateness_ms, params.dedup_capacity
    seen: Mapping[str, int] = state.seen
    pending: Sequence[PendingEvent] = state.pending
    clock, settled = state.clock_ts, state
    settled_ts = state.last_ts
    outcomes: list[Outcome] = []
    touched: list[tuple[str, int]] = []
    new_seen: dict[str, int] | None = None
    new_pending: list[PendingEvent] = []
    for event in events:
        event_id, ts = event.event_id, event.ts
        if event_id in seen:
            outcomes.append(duplicate)
            continue
        if (clock is not None and ts < clock - lateness) or (
            settled_ts is not None and ts <= settled_ts
        ):
            outcomes.append(late)
            continue
        if new_seen is None:  # the first applied event: from here on, ours to change
            seen = new_seen = dict(seen)
            pending = new_pending = list(pending)
        event_type = _TYPE_VALUES[event.type]  # Enum.value is a property: 5x a lookup
        fact = (ts, event_id, event_type, event.item_id, event.dwell_ms)
        if not new_pending or fact >= new_pending[-1]:  # the common case: in order
            new_pending.append(fact)
        else:
            insort(new_pending, fact)
        if clock is None or ts > clock:
            clock = ts
        mark = clock - lateness
        count = len(new_pending)
        ready = 0
        while ready < count and (new_pending[ready][0] < mark or count - ready > MAX_PENDING):
            ready += 1
        if ready:
            settled = _fold(settled, new_pending[:ready], params)
            settled_ts = settled.last_ts
            del new_pending[:ready]
        new_seen[event_id] = ts
        _prune_seen(new_seen, settled_ts, capacity)
        outcomes.append(applied)
        if event_type != _IMPRESSION:
            touched.append((event.item_id, ts))
    if new_seen is None:
        return state, outcomes, touched
    updated = _with(settled, seen=new_seen, pending=tuple(new_pending), clock_ts=clock)
    return updated, outcomes, touched


def _move_embeddings(
    version: str,
    catalog: ItemEmbeddings,
    stored: Sequence[bytes | None],
    updates: list[UserUpdate],
    params: FeatureParams,
) -> None:
    """Step each user's `version` embedding toward the items they touched (see `update_users`)."""
    rows_of = catalog.rows
    known: list[tuple[int, list[int]]] = []  # (user position, item rows in order)
    for position, update in enumerate(updates):
        rows = []
        for item_id, _ in update.touched_items:
            row = rows_of.get(item_id)
            if row is None:
                update.unknown_items[version] = update.unknown_items.get(version, 0) + 1
            else:
                rows.append(row)
        if rows:
            known.append((position, rows))
    if not known:
        return
    dim = catalog.dim
    current = np.zeros((len(known), dim), dtype=np.float32)
    has = np.zeros(len(known), dtype=bool)
    size = 4 * dim
    values = [stored[position] for position, _ in known]
    held = [n for n, value in enumerate(values) if value and len(value) == size]
    if held:  # one conversion for all the stored vectors, not one a user
        joined = b"".join([values[n] for n in held])  # type: ignore[misc]
        current[held] = np.frombuffer(joined, dtype="<f4").reshape(len(held), dim)
        has[held] = True
    longest = max(len(rows) for _, rows in known)
    for step_index in range(longest):
        users = np.array([n for n, (_, rows) in enumerate(known) if len(rows) > step_index])
        item_rows = np.array([known[n][1][step_index] for n in users])
        step = params.learning_rate * catalog.vectors[item_rows]
        moved = params.decay * current[users] + step
        current[users] = np.where(has[users, None], moved, step)
        has[users] = True
    for (position, _), vector in zip(known, list(current), strict=True):
        updates[position].embeddings[version] = vector


def popular_weight(ts: int, epoch_ms: int, half_life_ms: int) -> float:
    """Forward-decay weight of an interaction at `ts`: doubles every half-life after epoch."""
    exponent = min((ts - epoch_ms) / half_life_ms, 1000.0)  # 2**1024 overflows a double
    return float(2.0**exponent)


# --- state on the wire -----------------------------------------------------------


# Format 4 is MessagePack: STATE_MAGIC, then one array of UserState's fields in their
# order (tuples as arrays, `counts` and `seen` as maps, in their iteration order), so
# one call in C writes it and one reads it back: less than half of format 3's cost, and
# smaller (benchmarks/README.md). A state it cannot hold (a number beyond 64
# bits) is written as JSON. The reader tells the forms apart by the first bytes, so
# stores written by earlier jobs still load: JSON starts with `{`, format 3 with
# FORMAT_3_MAGIC (see `_decode_state_format_3`).
STATE_MAGIC = b"\x00\x04"
"""The first bytes of the binary form `encode_state` writes."""
_STATE_FIELDS = tuple(UserState.__dataclass_fields__)


def encode_state(state: UserState) -> bytes:
    """The compact binary form of `state` (the job's private `state` key)."""
    attributes = state.__dict__
    # A state's attributes are in field order (made by __init__, `_with` or decode_state),
    # so they are taken as they are; in any other order, field by field.
    values = (
        list(attributes.values())
        if tuple(attributes) == _STATE_FIELDS
        else [attributes[name] for name in _STATE_FIELDS]
    )
    try:
        packed = msgpack.packb(values)
    except (OverflowError, ValueError, TypeError):
        return encode_state_json(state)  # a number beyond 64 bits, or text with a lone surrogate
    return STATE_MAGIC + packed


class UnreadableState(ValueError):
    """Stored state bytes this job cannot decode (another format, another writer's)."""


def decode_state(data: bytes | str | None, params: FeatureParams | None = None) -> UserState:
    """The state stored in `data` (binary or the older JSON); a fresh state when there is none;
    UnreadableState when `data` is none of the forms this job reads.

    Windows that are no longer configured are dropped (a configuration change
    then starts those counts afresh rather than misreading old buckets).
    """
    try:
        if not data:
            return UserState()
        if isinstance(data, str) or not data.startswith(STATE_MAGIC):
            if isinstance(data, bytes) and data.startswith(FORMAT_3_MAGIC):
                return _decode_state_format_3(data, params)
            return decode_state_json(data, params)
        values = msgpack.unpackb(
            memoryview(data)[len(STATE_MAGIC) :], use_list=False, strict_map_key=False
        )
        if len(values) != len(_STATE_FIELDS):
            raise ValueError(f"a binary state of {len(values)} fields, not {len(_STATE_FIELDS)}")
        state = object.__new__(UserState)
        attributes = state.__dict__
        attributes.update(zip(_STATE_FIELDS, values, strict=True))
        counts = attributes["counts"]
        if params is not None and counts and not params.window_names.issuperset(counts):
            names = params.window_names
            attributes["counts"] = {name: rows for name, rows in counts.items() if name in names}
        return state
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error) as exc:
        # (msgpack's and json's errors are ValueErrors)
        head = bytes(data[:4]) if isinstance(data, bytes) else data[:4] if data else b""
        raise UnreadableState(
            f"a state of {len(data or b'')} bytes starting {head!r} is in no form this job "
            f"reads ({type(exc).__name__}: {exc})"
        ) from exc


def unreadable_update(events: Sequence[Event], problem: str) -> UserUpdate:
    """What a user's `events` did when their stored state cannot be read: nothing."""
    outcomes = [Outcome.UNREADABLE_STATE] * len(events)
    return UserUpdate(_FRESH, outcomes, {}, [], {}, problem)


# Format 3, written by the jobs before format 4 (read only): FORMAT_3_MAGIC, then the
# count of int64 values (uint32), the values (little-endian int64, NONE for a missing
# one), then every string of the state in UTF-8 joined by STRING_SEPARATOR. Ints, in
# order: last_ts, previous_gap_ms, dwell_total_ms, dwell_events, session_start_ts,
#   session_events, events_applied, clock_ts, has a session id (0/1), recent items,
#   windows, seen ids, pending events, event types per count row;
#   the ts of each recent item; per window its bucket count, then per bucket its
#   index and one count per type; the ts of each seen id; per pending event its ts,
#   type (index in EVENT_TYPE_NAMES) and dwell.
# Strings, in order: the session id (if any), the recent items, the window names,
# the seen ids, then per pending event its id and item id.
FORMAT_3_MAGIC = b"\x00\x03"
STRING_SEPARATOR = "\x1f"
NONE = -(2**63)
_COUNT = struct.Struct("<I")
_HEADER = len(FORMAT_3_MAGIC) + _COUNT.size


def _decode_state_format_3(data: bytes, params: FeatureParams | None) -> UserState:
    (count,) = _COUNT.unpack_from(data, len(FORMAT_3_MAGIC))
    ints = struct.unpack_from(f"<{count}q", data, _HEADER)
    text = data[_HEADER + 8 * count :].decode()
    strings = text.split(STRING_SEPARATOR) if text else []
    names = None if params is None else params.window_names
    (last_ts, gap, dwell_total, dwell_events, session_start, session_events, applied, clock,
     has_session, n_recent, n_windows, n_seen, n_pending, n_types) = ints[:14]  # fmt: skip
    i, j = 14, 0
    session_id = None
    if has_session:
        session_id, j = strings[0], 1
    recent = tuple(zip(ints[i : i + n_recent], strings[j : j + n_recent], strict=True))
    i, j = i + n_recent, j + n_recent
    counts: dict[str, Mapping[int, tuple[int, ...]]] = {}
    for name in strings[j : j + n_windows]:
        n_buckets = ints[i]
        i += 1
        row = 1 + n_types
        if names is None or name in names:
            counts[name] = {
                ints[k]: ints[k + 1 : k + row] for k in range(i, i + row * n_buckets, row)
            }
        i += row * n_buckets
    j += n_windows
    seen = dict(zip(strings[j : j + n_seen], ints[i : i + n_seen], strict=True))
    i, j = i + n_seen, j + n_seen
    pending = tuple(
        (
            ints[k],
            strings[j + 2 * n],
            EVENT_TYPE_NAMES[ints[k + 1]],
            strings[j + 2 * n + 1],
            None if ints[k + 2] == NONE else ints[k + 2],
        )
        for n, k in enumerate(range(i, i + 3 * n_pending, 3))
    )
    return _with(
        _FRESH,
        last_ts=None if last_ts == NONE else last_ts,
        previous_gap_ms=None if gap == NONE else gap,
        recent=recent,
        counts=counts,
        dwell_total_ms=dwell_total,
        dwell_events=dwell_events,
        session_id=session_id,
        session_start_ts=None if session_start == NONE else session_start,
        session_events=session_events,
        seen=seen,
        events_applied=applied,
        pending=pending,
        clock_ts=None if clock == NONE else clock,
    )


def encode_state_json(state: UserState) -> bytes:
    """The JSON form of `state` (format 2): what the job wrote before the binary form, and
    still writes for a state the binary form cannot hold."""
    document: dict[str, Any] = {
        "format": JSON_STATE_FORMAT,
        "last_ts": state.last_ts,
        "previous_gap_ms": state.previous_gap_ms,
        "recent": state.recent,
        "counts": {w: [[b, *c] for b, c in buckets.items()] for w, buckets in state.counts.items()},
        "dwell": [state.dwell_total_ms, state.dwell_events],
        "session": [state.session_id, state.session_start_ts, state.session_events],
        "seen": state.seen,
        "events": state.events_applied,
        "pending": state.pending,
        "clock": state.clock_ts,
    }
    return _ENCODER.encode(document).encode()


def decode_state_json(data: bytes | str, params: FeatureParams | None = None) -> UserState:
    """The state in a JSON `data` (formats 1 and 2); a fresh state for an unknown format."""
    document = _DECODER.decode(data.decode() if isinstance(data, bytes) else data)
    if document.get("format") not in (1, JSON_STATE_FORMAT):
        return UserState()
    names = None if params is None else params.window_names
    session_id, session_start, session_events = document["session"]
    return UserState(
        last_ts=document["last_ts"],
        previous_gap_ms=document["previous_gap_ms"],
        recent=tuple(map(tuple, document["recent"])),
        counts={
            w: {row[0]: tuple(row[1:]) for row in rows}
            for w, rows in document["counts"].items()
            if names is None or w in names
        },
        dwell_total_ms=document["dwell"][0],
        dwell_events=document["dwell"][1],
        session_id=session_id,
        session_start_ts=session_start,
        session_events=session_events,
        seen=document["seen"],
        events_applied=document["events"],
        pending=tuple(map(tuple, document.get("pending", ()))),
        clock_ts=document.get("clock", document["last_ts"]),
    )
