"""The feature math as pure functions: examples first, then properties (hypothesis)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_contracts.events import Event, EventType
from stream_jobs.item_embeddings import ItemEmbeddings
from stream_jobs.user_features import (
    EVENT_TYPE_NAMES,
    MAX_PENDING,
    FeatureParams,
    Outcome,
    UnreadableState,
    UserState,
    apply_event,
    decode_state,
    encode_state,
    feature_fields,
    fold_events,
    popular_weight,
    recent_item_ids,
    update_embedding,
    update_user,
    view,
    window_counts,
)

T0 = 1_767_225_600_000
MIN = 60_000
HOUR = 60 * MIN
PARAMS = FeatureParams(last_n=3, session_gap_ms=30 * MIN, allowed_lateness_ms=HOUR)
# Every event of a property stream (about two days) is within this lateness.
ANY_ORDER = 100 * HOUR


def ev(n: int, ts: int, kind: str = "click", item: str | None = None, **extra: object) -> Event:
    return Event(
        event_id=f"e{n}",
        user_id="u",
        item_id=item or f"i{n}",
        type=EventType(kind),
        ts=ts,
        **extra,  # type: ignore[arg-type]
    )


def fold(events: list[Event], params: FeatureParams = PARAMS) -> UserState:
    """What readers see after `events` arrived in this order."""
    return view(fold_events(UserState(), events, params)[0], params)


# --- examples ----------------------------------------------------------------------


def test_counts_per_type_and_window() -> None:
    state = fold(
        [ev(1, T0), ev(2, T0 + MIN, "view"), ev(3, T0 + 2 * MIN), ev(4, T0 + 3 * MIN, "impression")]
    )
    counts = window_counts(state, PARAMS)
    assert counts[("1h", "click")] == 2
    assert counts[("1h", "view")] == 1
    assert counts[("1h", "impression")] == 1
    assert counts[("24h", "purchase")] == 0
    assert len(counts) == 2 * len(EVENT_TYPE_NAMES)  # every pair, zeros included


def test_a_window_forgets_events_older_than_it_measured_from_the_newest_event() -> None:
    state = fold([ev(1, T0), ev(2, T0 + 61 * MIN)])
    counts = window_counts(state, PARAMS)
    assert counts[("1h", "click")] == 1  # the first is 61 minutes before the newest
    assert counts[("24h", "click")] == 2
    state = fold([ev(1, T0), ev(2, T0 + 25 * HOUR)])
    assert window_counts(state, PARAMS)[("24h", "click")] == 1
    assert state.counts["24h"] and len(state.counts["1h"]) == 1  # expired buckets are dropped


def test_recent_items_are_newest_first_trimmed_and_exclude_impressions() -> None:
    events = [
        ev(1, T0),
        ev(2, T0 + 1000),
        ev(3, T0 + 2000, "impression"),
        ev(4, T0 + 3000),
        ev(5, T0 + 4000),
    ]
    assert recent_item_ids(fold(events), PARAMS) == ["i5", "i4", "i2"]


def test_a_late_event_takes_its_place_by_time_in_recent_items_and_windows() -> None:
    state = fold([ev(1, T0), ev(2, T0 + 10_000), ev(3, T0 + 5_000)])
    assert recent_item_ids(state, PARAMS) == ["i2", "i3", "i1"]
    assert state.last_ts == T0 + 10_000
    assert state.previous_gap_ms == 5_000  # as sorted: the newest two are e3 and e2
    lenient = FeatureParams(allowed_lateness_ms=3 * HOUR)
    too_late_for_1h = fold([ev(1, T0 + 2 * HOUR), ev(2, T0)], lenient)
    assert window_counts(too_late_for_1h, lenient)[("1h", "click")] == 1
    assert window_counts(too_late_for_1h, lenient)[("24h", "click")] == 2


def test_an_event_behind_the_allowed_lateness_is_late_and_changes_nothing() -> None:
    params = FeatureParams(allowed_lateness_ms=10 * MIN)
    state, _ = fold_events(UserState(), [ev(1, T0), ev(2, T0 + HOUR)], params)
    after, outcome = apply_event(state, ev(3, T0 + HOUR - 11 * MIN), params)
    assert outcome is Outcome.LATE and after is state
    just_in_time, outcome = apply_event(state, ev(4, T0 + HOUR - 10 * MIN), params)
    assert outcome is Outcome.APPLIED
    assert recent_item_ids(just_in_time, params) == ["i2", "i4", "i1"]


def test_a_very_active_user_settles_the_oldest_events_early_and_stays_bounded() -> None:
    params = FeatureParams(allowed_lateness_ms=HOUR, dedup_capacity=10)
    events = [ev(n, T0 + n) for n in range(MAX_PENDING + 50)]
    state, outcomes = fold_events(UserState(), events, params)
    assert set(outcomes) == {Outcome.APPLIED}
    assert len(state.pending) == MAX_PENDING and len(state.seen) <= MAX_PENDING + 10
    assert view(state, params).events_applied == len(events)
    _, outcome = apply_event(state, ev(9999, T0 + 49), params)  # before a settled event
    assert outcome is Outcome.LATE


def test_sessions_split_on_gaps_and_late_events_join_the_current_one() -> None:
    state = fold([ev(1, T0), ev(2, T0 + 10 * MIN), ev(3, T0 + 45 * MIN)])
    assert (state.session_id, state.session_start_ts, state.session_events) == (
        "e3",
        T0 + 45 * MIN,
        1,
    )
    state = fold([ev(1, T0), ev(2, T0 + 10 * MIN), ev(3, T0 + 20 * MIN), ev(4, T0 + 5 * MIN)])
    assert (state.session_id, state.session_events) == ("e1", 4)


def test_mean_dwell_counts_only_events_that_carry_a_dwell_time() -> None:
    state = fold(
        [
            ev(1, T0, "dwell", dwell_ms=1000),
            ev(2, T0 + 1, "click"),
            ev(3, T0 + 2, "view", dwell_ms=3000),
        ]
    )
    fields = feature_fields(state, PARAMS)
    assert fields["dwell_mean_ms"] == "2000.0"
    assert fields["dwell_events"] == "2"
    assert feature_fields(UserState(), PARAMS)["dwell_mean_ms"] == ""


def test_feature_fields_describe_the_state() -> None:
    fields = feature_fields(fold([ev(1, T0), ev(2, T0 + 4000, "purchase")]), PARAMS)
    assert fields["count:purchase:1h"] == "1"
    assert fields["count:click:24h"] == "1"
    assert fields["last_ts"] == str(T0 + 4000)
    assert fields["previous_gap_ms"] == "4000"
    assert fields["session_events"] == "2"
    assert fields["events"] == "2"


def test_a_seen_event_id_changes_nothing() -> None:
    state = fold([ev(1, T0), ev(2, T0 + 1000)])
    again, outcome = apply_event(state, ev(1, T0), PARAMS)
    assert outcome is Outcome.DUPLICATE and again is state
    # the same id with other content is still the same event
    again, outcome = apply_event(state, ev(2, T0 + 99_000, "purchase"), PARAMS)
    assert outcome is Outcome.DUPLICATE and again is state


def test_pending_ids_are_kept_and_settled_ones_evicted_so_replays_stay_harmless() -> None:
    params = FeatureParams(dedup_capacity=1, allowed_lateness_ms=1000)
    events = [ev(1, T0), ev(2, T0 + 1000), ev(3, T0 + 2000), ev(4, T0 + 2500)]
    state, _ = fold_events(UserState(), events, params)
    assert set(state.seen) == {"e2", "e3", "e4"}  # e2 settled (newest 1), e3, e4 pending
    for replay in events:
        again, outcome = apply_event(state, replay, params)
        assert outcome in (Outcome.DUPLICATE, Outcome.LATE) and again is state
    late_but_new, outcome = apply_event(state, ev(9, T0 + 1600), params)
    assert outcome is Outcome.APPLIED and view(late_but_new, params).events_applied == 5


def test_state_survives_its_wire_form() -> None:
    state = fold(
        [ev(1, T0, "dwell", dwell_ms=5), ev(2, T0 + 3 * HOUR), ev(3, T0 + 1000, "impression")]
    )
    assert decode_state(encode_state(state), PARAMS) == state
    raw, _ = fold_events(
        UserState(), [ev(1, T0), ev(2, T0 + 2 * HOUR), ev(3, T0 + 90 * MIN)], PARAMS
    )
    assert raw.pending and decode_state(encode_state(raw), PARAMS) == raw
    assert decode_state(None) == UserState()
    assert decode_state(b'{"format": 999}') == UserState()


@pytest.mark.parametrize(
    "stored",
    [
        b"\x00\x05a newer binary form",
        b"\x00\x04\xc1",  # the binary form's magic, then no MessagePack
        b"\x00\x04\x93\x01\x02\x03",  # MessagePack of the wrong length
        b"\x00\x03\x05\x00",  # format 3 cut short
        b'{"format": 2}',  # JSON without its fields
        b"[1, 2]",
        b"\xff\xfe",
    ],
)
def test_a_state_in_no_form_this_job_reads_is_an_unreadable_state(stored: bytes) -> None:
    """Not an error of another kind (the job dead-letters that user's events on it)."""
    with pytest.raises(UnreadableState, match="in no form this job reads"):
        decode_state(stored, PARAMS)


def test_windows_no_longer_configured_are_dropped_when_state_is_read() -> None:
    state = fold([ev(1, T0)])
    only_2h = FeatureParams(windows=(("2h", 2 * HOUR),))
    decoded = decode_state(encode_state(state), only_2h)
    assert set(decoded.counts) == set()
    assert (
        window_counts(apply_event(decoded, ev(2, T0 + 1), only_2h)[0], only_2h)[("2h", "click")]
        == 1
    )


def test_the_online_embedding_decays_and_steps_toward_each_touched_item() -> None:
    item = np.array([1.0, 0.0], dtype=np.float32)
    first = update_embedding(None, item, learning_rate=0.5, decay=0.9)
    assert first.tolist() == [0.5, 0.0] and first.dtype == np.float32
    second = update_embedding(first, np.array([0.0, 1.0]), learning_rate=0.5, decay=0.9)
    assert np.allclose(second, [0.45, 0.5])


def test_update_user_moves_each_version_that_knows_the_item() -> None:
    items = {
        "v1": ItemEmbeddings.from_arrays("v1", ["a", "b"], np.eye(2)),
        "v2": ItemEmbeddings.from_arrays("v2", ["a"], np.ones((1, 3))),
    }
    events = [
        ev(1, T0, item="a"),
        ev(2, T0 + 1, item="b"),
        ev(3, T0 + 2, "impression", item="a"),
        ev(1, T0, item="a"),
    ]
    update = update_user(UserState(), {"v1": None, "v2": None}, events, PARAMS, items)
    assert update.outcomes == [Outcome.APPLIED, Outcome.APPLIED, Outcome.APPLIED, Outcome.DUPLICATE]
    assert np.allclose(
        update.embeddings["v1"], [0.098, 0.1]
    )  # a then b; impressions do not move it
    assert np.allclose(update.embeddings["v2"], [0.1, 0.1, 0.1])
    assert update.unknown_items == {"v2": 1}
    assert update.touched_items == [("a", T0), ("b", T0 + 1)]
    assert update.changed


def test_only_duplicates_is_no_change() -> None:
    state = fold([ev(1, T0)])
    update = update_user(state, {}, [ev(1, T0)], PARAMS, {})
    assert not update.changed and update.state is state and update.embeddings == {}


def test_popular_weight_doubles_every_half_life_and_never_overflows() -> None:
    day = 86_400_000
    assert popular_weight(T0 + day, T0, day) == pytest.approx(2 * popular_weight(T0, T0, day))
    assert np.isfinite(popular_weight(T0 + 10**6 * day, T0, day))


# --- properties ----------------------------------------------------------------------

TYPES = st.sampled_from([t.value for t in EventType])


@st.composite
def streams(draw: st.DrawFn, max_size: int = 40) -> list[Event]:
    """Distinct events of one user over about two days, in arbitrary order."""
    size = draw(st.integers(min_value=0, max_value=max_size))
    offsets = draw(st.lists(st.integers(0, 50 * HOUR), min_size=size, max_size=size))
    kinds = draw(st.lists(TYPES, min_size=size, max_size=size))
    items = draw(st.lists(st.integers(0, 5), min_size=size, max_size=size))
    return [
        ev(
            n,
            T0 + off,
            kind,
            item=f"i{item}",
            dwell_ms=(n * 37 % 5000) if kind == "dwell" else None,
        )
        for n, (off, kind, item) in enumerate(zip(offsets, kinds, items, strict=True))
    ]


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(streams())
def test_counts_are_never_negative_and_the_bigger_window_holds_the_smaller(
    events: list[Event],
) -> None:
    params = FeatureParams(dedup_capacity=1000, allowed_lateness_ms=ANY_ORDER)
    counts = window_counts(fold(events, params), params)
    assert all(n >= 0 for n in counts.values())
    assert sum(counts[("24h", t)] for t in EVENT_TYPE_NAMES) <= len(events)
    for t in EVENT_TYPE_NAMES:
        assert counts[("1h", t)] <= counts[("24h", t)]


@PROPERTY
@given(streams())
def test_window_counts_equal_a_brute_force_count_over_the_buckets(events: list[Event]) -> None:
    params = FeatureParams(dedup_capacity=1000, allowed_lateness_ms=ANY_ORDER)
    counts = window_counts(fold(events, params), params)
    newest = max((e.ts for e in events), default=0)
    for name, window_ms in params.windows:
        width = window_ms // params.buckets_per_window
        for t in EVENT_TYPE_NAMES:
            inside = [
                e
                for e in events
                if e.type.value == t and e.ts // width > newest // width - params.buckets_per_window
            ]
            assert counts[(name, t)] == len(inside)
            # the bucketed window is the exact one up to its resolution
            exact = [e for e in events if e.type.value == t and newest - e.ts < window_ms - width]
            assert len(exact) <= counts[(name, t)]


@PROPERTY
@given(streams(), st.randoms(use_true_random=False))
def test_counts_and_recent_items_do_not_depend_on_arrival_order(
    events: list[Event], rnd: random.Random
) -> None:
    params = FeatureParams(dedup_capacity=1000, allowed_lateness_ms=ANY_ORDER)
    shuffled = events[:]
    rnd.shuffle(shuffled)
    a, b = fold(events, params), fold(shuffled, params)
    assert window_counts(a, params) == window_counts(b, params)
    assert recent_item_ids(a, params) == recent_item_ids(b, params)
    assert (a.last_ts, a.events_applied, a.dwell_total_ms) == (
        b.last_ts,
        b.events_applied,
        b.dwell_total_ms,
    )


@PROPERTY
@given(streams(), st.randoms(use_true_random=False), st.sampled_from([1, 3, 64]))
def test_replay_and_shuffled_duplicates_change_nothing(
    events: list[Event], rnd: random.Random, capacity: int
) -> None:
    params = FeatureParams(dedup_capacity=capacity, allowed_lateness_ms=ANY_ORDER)
    once = fold(events, params)
    assert fold(events + events, params) == once  # a whole replay
    # duplicates of any events, each inserted anywhere after its original
    with_duplicates = list(events)
    for event in rnd.sample(events, k=len(events) // 2):
        first = with_duplicates.index(event)
        with_duplicates.insert(rnd.randint(first + 1, len(with_duplicates)), event)
    assert fold(with_duplicates, params) == once


@PROPERTY
@given(streams(max_size=20))
def test_the_state_round_trips_through_json_after_any_stream(events: list[Event]) -> None:
    state = fold(events, PARAMS)
    assert decode_state(encode_state(state), PARAMS) == state


@PROPERTY
@given(
    streams(),
    st.lists(st.integers(0, 10 * MIN), min_size=40, max_size=40),
    st.sampled_from([0, MIN, 10 * MIN]),
    st.sampled_from([1, 64]),
)
def test_any_arrival_within_the_allowed_lateness_gives_the_sorted_streams_features(
    events: list[Event], delays: list[int], lateness: int, capacity: int
) -> None:
    """Each event arrives up to `lateness` after its time (a delay), so every event is at
    most `lateness` behind the newest one before it: features as for the sorted stream."""
    params = FeatureParams(last_n=5, allowed_lateness_ms=lateness, dedup_capacity=capacity)
    in_order = sorted(events, key=lambda e: (e.ts, e.event_id))
    arrival = sorted(
        events, key=lambda e: (e.ts + delays[int(e.event_id[1:])] * lateness // (10 * MIN), e.ts)
    )
    state, outcomes = fold_events(UserState(), arrival, params)
    assert set(outcomes) <= {Outcome.APPLIED}
    expected, _ = fold_events(UserState(), in_order, params)
    assert feature_fields(state, params) == feature_fields(expected, params)
    assert recent_item_ids(state, params) == recent_item_ids(expected, params)


@PROPERTY
@given(streams(), st.randoms(use_true_random=False))
def test_a_shuffled_stream_applies_or_reports_late_every_event(
    events: list[Event], rnd: random.Random
) -> None:
    """Nothing is silent: each event is applied or LATE, and the applied ones alone, sorted,
    give the same features."""
    params = FeatureParams(allowed_lateness_ms=30 * MIN)
    shuffled = events[:]
    rnd.shuffle(shuffled)
    state, outcomes = fold_events(UserState(), shuffled, params)
    assert set(outcomes) <= {Outcome.APPLIED, Outcome.LATE}
    applied = [e for e, o in zip(shuffled, outcomes, strict=True) if o is Outcome.APPLIED]
    expected, _ = fold_events(
        UserState(), sorted(applied, key=lambda e: (e.ts, e.event_id)), params
    )
    assert feature_fields(state, params) == feature_fields(expected, params)
