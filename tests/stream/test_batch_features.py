"""The feature job's fast paths agree with the reference functions they replace.

The binary state codec still reads the JSON states earlier jobs wrote; the batch
update (`update_users`, numpy over the batch's users) gives the bits `update_user`
gives one user at a time; the readers' fields come out of one pass equal to those
of the folded view.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_contracts import feature_keys as keys
from recsys_contracts.events import Event, EventType
from stream_jobs.item_embeddings import ItemEmbeddings
from stream_jobs.user_features import (
    EVENT_TYPE_NAMES,
    MAX_PENDING,
    SCALAR_FIELDS,
    STATE_MAGIC,
    FeatureParams,
    Outcome,
    UserState,
    decode_state,
    encode_state,
    encode_state_json,
    fold_events,
    reader_values,
    update_user,
    update_users,
    view,
    window_totals,
)

T0 = 1_767_225_600_000
MIN = 60_000
PARAMS = FeatureParams(last_n=4, allowed_lateness_ms=30 * MIN)
SHORT_WINDOW = FeatureParams(
    last_n=4, allowed_lateness_ms=30 * MIN, windows=(("10m", 10 * MIN), ("1h", 60 * MIN))
)


def event(n: int, user: str, ts: int, kind: str, item: str) -> Event:
    return Event(
        event_id=f"{user}-e{n}",
        user_id=user,
        item_id=item,
        type=EventType(kind),
        ts=ts,
        dwell_ms=n * 13 if kind == "dwell" else None,
    )


def random_events(rng: random.Random, user: str, count: int) -> list[Event]:
    """Events of one user over two hours, in an arbitrary order, some of them twice."""
    events = [
        event(
            n,
            user,
            T0 + rng.randrange(2 * 60 * MIN),
            rng.choice([t.value for t in EventType]),
            f"i{rng.randrange(8)}",
        )
        for n in range(count)
    ]
    return events + rng.sample(events, k=min(3, len(events)))


def test_a_json_state_written_before_the_binary_codec_still_loads() -> None:
    # Verbatim what the JSON codec stored (format 2): a store written by an older job.
    stored = (
        b'{"format":2,"last_ts":1767225660000,"previous_gap_ms":60000,'
        b'"recent":[[1767225660000,"i2"],[1767225600000,"i1"]],'
        b'"counts":{"1h":[[29453760,1,1,0,0,0]],"24h":[[1227240,1,1,0,0,0]]},'
        b'"dwell":[0,0],"session":["e1",1767225600000,2],"seen":{"e1":1767225600000,'
        b'"e2":1767225660000},"events":2,"pending":[[1767225720000,"e3","dwell","i3",500]],'
        b'"clock":1767225720000}'
    )
    state = decode_state(stored, FeatureParams())
    assert state.recent == ((1767225660000, "i2"), (1767225600000, "i1"))
    assert state.counts["1h"] == {29453760: (1, 1, 0, 0, 0)}
    assert state.session_id == "e1" and state.events_applied == 2
    assert state.pending == ((1767225720000, "e3", "dwell", "i3", 500),)
    # Written back, it takes the binary form and reads as the same state.
    assert encode_state(state).startswith(STATE_MAGIC)
    assert decode_state(encode_state(state), FeatureParams()) == state


def test_a_format_3_state_written_before_the_msgpack_codec_still_loads() -> None:
    # Verbatim what the format-3 codec (8c8341d) stored for seven events of one user.
    stored = bytes.fromhex(
        "00033a000000a010e1769b010000a0680600000000000000000000000000000000000000000000a8da769b01"
        "000002000000000000000200000000000000c01b01779b010000010000000000000002000000000000000200"
        "000000000000070000000000000005000000000000000500000000000000a010e1769b01000000a8da769b01"
        "00000200000000000000c06dc101000000000100000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000c76dc1010000000000000000000000000100000000000000000000000000"
        "0000000000000000000000000000000000000100000000000000e8b912000000000001000000000000000100"
        "00000000000000000000000000000000000000000000000000000000000000a8da769b010000a010e1769b01"
        "00004079e7769b010000e0e1ed769b010000804af4769b01000020b3fa769b010000c01b01779b0100004079"
        "e7769b0100000300000000000000f401000000000000e0e1ed769b0100000400000000000000000000000000"
        "0080804af4769b0100000200000000000000000000000000008020b3fa769b01000000000000000000000000"
        "000000000080c01b01779b0100000100000000000000000000000000008065301f69311f69301f31681f3234"
        "681f65301f65311f65321f65331f65341f65351f65361f65321f69321f65331f69301f65341f69311f65351f"
        "69321f65361f6930"
    )
    state = decode_state(stored, PARAMS)
    assert state.recent == ((T0 + 7 * MIN, "i1"), (T0, "i0"))
    assert state.counts == {
        "1h": {29453760: (1, 0, 0, 0, 0), 29453767: (0, 1, 0, 0, 0)},
        "24h": {1227240: (1, 1, 0, 0, 0)},
    }
    assert state.session_id == "e0" and state.events_applied == 2
    assert list(state.seen) == [f"e{n}" for n in range(7)]
    assert state.pending[0] == (T0 + 14 * MIN, "e2", "dwell", "i2", 500)
    assert state.pending[1] == (T0 + 21 * MIN, "e3", "impression", "i0", None)
    assert state.clock_ts == T0 + 42 * MIN
    # Written back, it takes the current binary form and reads as the same state.
    assert encode_state(state).startswith(STATE_MAGIC)
    assert decode_state(encode_state(state), PARAMS) == state


def test_a_state_the_binary_form_cannot_hold_is_written_as_json_and_reads_back() -> None:
    odd = UserState(last_ts=T0, clock_ts=T0, dwell_total_ms=2**70, dwell_events=1)  # > 64 bits
    data = encode_state(odd)
    assert data.startswith(b"{")
    assert decode_state(data) == odd
    # Any text is fine in the binary form (format 3 could not hold its separator).
    separator = UserState(last_ts=T0, clock_ts=T0, seen={"id\x1fwith a separator": T0})
    assert encode_state(separator).startswith(STATE_MAGIC)
    assert decode_state(encode_state(separator)) == separator


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1))
def test_any_state_reads_back_as_written_down_to_its_order_and_bytes(seed: int) -> None:
    rng = random.Random(seed)
    state, _ = fold_events(UserState(), random_events(rng, "u", rng.randrange(80)), PARAMS)
    data = encode_state(state)
    back = decode_state(data, PARAMS)
    assert back == state
    assert list(back.seen.items()) == list(state.seen.items())  # the eviction order too
    assert encode_state(back) == data


def test_the_binary_state_is_smaller_than_the_json_one() -> None:
    rng = random.Random(3)
    state, _ = fold_events(UserState(), random_events(rng, "u", 40), PARAMS)
    assert len(encode_state(state)) < len(encode_state_json(state))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(1, 12))
def test_the_batch_update_gives_each_user_the_bits_of_the_one_user_update(
    seed: int, users: int
) -> None:
    rng = random.Random(seed)
    items = {
        # v2 lacks i6 and i7: interactions with them move only v1 and count as unknown.
        "v1": ItemEmbeddings.from_arrays(
            "v1", [f"i{n}" for n in range(8)], np.random.default_rng(seed).normal(size=(8, 5))
        ),
        "v2": ItemEmbeddings.from_arrays(
            "v2", [f"i{n}" for n in range(6)], np.random.default_rng(seed + 1).normal(size=(6, 3))
        ),
    }
    names = [f"u{n}" for n in range(users)]
    # Some users already hold a state and embeddings (one of another length: none yet).
    states: list[UserState] = []
    stored: dict[str, list[bytes | None]] = {"v1": [], "v2": []}
    events: list[list[Event]] = []
    for name in names:
        earlier, _ = fold_events(UserState(), random_events(rng, name, rng.randrange(3)), PARAMS)
        states.append(earlier)
        stored["v1"].append(
            None
            if rng.random() < 0.5
            else keys.encode_embedding(np.array([0.5, -1, 2, 0, 1], np.float32))
        )
        stored["v2"].append(rng.choice([None, b"\x00" * 8, keys.encode_embedding(np.ones(3))]))
        events.append(random_events(rng, name, rng.randrange(6)))
    batch = update_users(states, stored, events, PARAMS, items)
    for n, update in enumerate(batch):
        current = {v: keys.decode_embedding(stored[v][n] or b"", items[v].dim) for v in items}
        one = update_user(states[n], current, events[n], PARAMS, items)
        assert update.state == one.state and update.outcomes == one.outcomes
        assert update.touched_items == one.touched_items
        assert update.unknown_items == one.unknown_items
        assert {v: keys.encode_embedding(e) for v, e in update.embeddings.items()} == {
            v: keys.encode_embedding(e) for v, e in one.embeddings.items()
        }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(1, 120), st.sampled_from([4, 64]))
def test_the_batch_rules_give_each_user_the_state_and_outcomes_of_apply_event(
    seed: int, count: int, capacity: int
) -> None:
    # The reference: `apply_event` one event at a time, a new state each. Streams long
    # enough to settle events, evict seen ids (capacity 4) and redeliver some.
    params = FeatureParams(last_n=4, allowed_lateness_ms=30 * MIN, dedup_capacity=capacity)
    rng = random.Random(seed)
    earlier, _ = fold_events(UserState(), random_events(rng, "u", rng.randrange(20)), params)
    events = random_events(rng, "u", count)
    events += rng.sample(events, k=min(10, len(events)))
    expected, outcomes = fold_events(earlier, events, params)
    [update] = update_users([earlier], {}, [events], params, {})
    assert update.outcomes == outcomes
    assert update.state == expected
    assert list(update.state.seen.items()) == list(expected.seen.items())
    assert encode_state(update.state) == encode_state(expected)
    assert update.touched_items == [
        (e.item_id, e.ts)
        for e, outcome in zip(events, outcomes, strict=True)
        if outcome is Outcome.APPLIED and e.is_interaction
    ]


@pytest.mark.parametrize(("seed", "capacity"), [(1, 64), (2, 4096)])
def test_the_batch_rules_settle_early_past_max_pending_as_apply_event_does(
    seed: int, capacity: int
) -> None:
    # A lateness longer than the stream's two hours: no event settles by the watermark,
    # so past MAX_PENDING waiting events the oldest settle early, and events before them
    # that come later are late.
    params = FeatureParams(last_n=4, allowed_lateness_ms=180 * MIN, dedup_capacity=capacity)
    rng = random.Random(seed)
    earlier, _ = fold_events(UserState(), random_events(rng, "u", 5), params)
    events = random_events(rng, "u", MAX_PENDING + 200)
    events += rng.sample(events, k=10)
    expected, outcomes = fold_events(earlier, events, params)
    assert len(expected.pending) == MAX_PENDING and expected.last_ts is not None
    assert Outcome.LATE in outcomes
    [update] = update_users([earlier], {}, [events], params, {})
    assert update.outcomes == outcomes
    assert update.state == expected
    assert list(update.state.seen.items()) == list(expected.seen.items())
    assert encode_state(update.state) == encode_state(expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A 10-minute window, shorter than the lateness: pending events fall out of it too.
@given(st.integers(0, 2**32 - 1), st.sampled_from([PARAMS, SHORT_WINDOW]))
def test_the_readers_fields_equal_those_of_the_folded_view(
    seed: int, params: FeatureParams
) -> None:
    rng = random.Random(seed)
    state, _ = fold_events(UserState(), random_events(rng, "u", rng.randrange(30)), params)
    fields, recent = reader_values(state, params)
    seen = view(state, params)
    assert recent == [item for _, item in seen.recent]
    for (window, _), totals in zip(params.windows, window_totals(state, params), strict=True):
        for event_type, n in zip(EVENT_TYPE_NAMES, totals, strict=True):
            assert fields[f"count:{event_type}:{window}"] == str(n)
    dwell = f"{seen.dwell_total_ms / seen.dwell_events:.1f}" if seen.dwell_events else ""
    assert {name: fields[name] for name in SCALAR_FIELDS} == {
        "last_ts": "" if seen.last_ts is None else str(seen.last_ts),
        "previous_gap_ms": "" if seen.previous_gap_ms is None else str(seen.previous_gap_ms),
        "dwell_mean_ms": dwell,
        "dwell_events": str(seen.dwell_events),
        "session_id": seen.session_id or "",
        "session_start_ts": "" if seen.session_start_ts is None else str(seen.session_start_ts),
        "session_events": str(seen.session_events),
        "events": str(seen.events_applied),
    }
    assert list(fields) == list(params.field_names)
