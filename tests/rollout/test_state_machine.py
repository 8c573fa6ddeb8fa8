"""The rollout state machine, step by step, with an injected metrics source."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from recsys_operator.api.recommender_system import RolloutSpec
from recsys_operator.api.status import (
    AnalysisDecision,
    AnalysisResult,
    CanaryStatus,
    RolloutOutcome,
)
from recsys_operator.rollout.state_machine import Action, RolloutState, tick

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SPEC = RolloutSpec(steps=[10, 50, 100], interval="1m", progress_deadline="30m", max_inconclusive=2)


class Source:
    """Answers analyses from a script and records each call."""

    def __init__(self, *decisions: AnalysisDecision):
        self.decisions = list(decisions)
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, canary: CanaryStatus, window: float) -> AnalysisResult:
        self.calls.append((canary.version, window))
        decision = self.decisions.pop(0)
        return AnalysisResult(
            time="2026-01-01T00:00:00Z", decision=decision, reason=f"scripted {decision.value}"
        )


async def run(
    state: RolloutState,
    at: datetime,
    source: Source,
    version: str = "2",
    spec: RolloutSpec = SPEC,
    action: str | None = None,
):
    return await tick(version, spec, state, at, source, action)


async def test_no_rollout_when_the_version_is_unchanged() -> None:
    t = await run(RolloutState("1"), T0, Source(), version="1")
    assert t.state == RolloutState("1") and t.health.ok and not t.events


async def test_a_good_version_walks_every_step_and_is_promoted() -> None:
    source = Source(AnalysisDecision.PASS, AnalysisDecision.PASS)
    t = await run(RolloutState("1"), T0, source)
    assert t.state.canary is not None and (t.state.canary.weight, t.state.canary.step) == (10, 0)
    assert t.events[0].reason == "RolloutStarted"

    # Before the interval has passed nothing is analysed, and the state does not change.
    waiting = await run(t.state, T0 + timedelta(seconds=30), source)
    assert waiting.state == t.state and source.calls == []

    weights = []
    state = t.state
    for minute in (1, 2):
        t = await run(state, T0 + timedelta(minutes=minute, seconds=1), source)
        state = t.state
        weights.append(state.canary.weight if state.canary else "promoted")
    assert weights == [50, "promoted"]  # passing at 50% promotes: 100% is the promotion
    assert state.stable_version == "2" and state.canary is None
    assert state.last_rollout is not None and state.last_rollout.outcome is RolloutOutcome.PROMOTED
    assert t.promoted and t.events[-1].reason == "RolloutPromoted"
    assert source.calls == [("2", 60.0)] * 2


async def test_a_single_step_of_100_switches_at_once() -> None:
    t = await run(RolloutState("1"), T0, Source(), spec=RolloutSpec(steps=[100]))
    assert t.state.stable_version == "2" and t.state.canary is None and t.promoted


async def test_a_failed_analysis_rolls_back_at_once() -> None:
    started = (await run(RolloutState("1"), T0, Source())).state
    t = await run(started, T0 + timedelta(minutes=1, seconds=1), Source(AnalysisDecision.FAIL))
    assert t.state.canary is None and t.state.stable_version == "1"
    assert t.state.last_rollout.outcome is RolloutOutcome.ROLLED_BACK
    assert t.health.ok is False and t.health.reason == "RolledBack"
    assert t.events[0].warning and "scripted Fail" in t.events[0].message
    # The failed version is not retried while the spec still names it.
    again = await run(t.state, T0 + timedelta(minutes=2), Source())
    assert again.state.canary is None and again.health.reason == "RolledBack"


async def test_inconclusive_holds_then_rolls_back_past_the_limit() -> None:
    state = (await run(RolloutState("1"), T0, Source())).state
    source = Source(
        AnalysisDecision.INCONCLUSIVE, AnalysisDecision.WAIT, AnalysisDecision.INCONCLUSIVE
    )
    at = T0
    outcomes = []
    for _ in range(3):
        at += timedelta(minutes=1, seconds=1)
        t = await run(state, at, source)
        state = t.state
        outcomes.append(
            (state.canary.weight, state.canary.inconclusive_count)
            if state.canary
            else "rolled back"
        )
    assert outcomes == [(10, 1), (10, 2), "rolled back"]
    assert "inconclusive analyses in a row" in state.last_rollout.reason
    assert state.stable_version == "1"


async def test_never_promoted_without_a_pass_even_at_the_deadline() -> None:
    state = (await run(RolloutState("1"), T0, Source())).state
    t = await run(state, T0 + timedelta(minutes=31), Source())
    assert t.state.canary is None and t.state.stable_version == "1"
    assert t.health.reason == "ProgressDeadlineExceeded"


async def test_without_auto_rollback_a_failure_holds_for_a_person() -> None:
    spec = SPEC.model_copy(update={"auto_rollback": False})
    state = (await run(RolloutState("1"), T0, Source(), spec=spec)).state
    t = await run(
        state, T0 + timedelta(minutes=1, seconds=1), Source(AnalysisDecision.FAIL), spec=spec
    )
    assert t.state.canary is not None and t.state.canary.weight == 10
    assert t.health.ok is False and t.health.reason == "AnalysisFailed"


async def test_paused_rollout_does_not_analyse() -> None:
    spec = SPEC.model_copy(update={"paused": True})
    state = (await run(RolloutState("1"), T0, Source())).state
    source = Source()
    t = await run(state, T0 + timedelta(minutes=5), source, spec=spec)
    assert t.state == state and t.health.reason == "Paused" and source.calls == []


@pytest.mark.parametrize(
    ("action", "stable", "outcome"),
    [(Action.ABORT, "1", RolloutOutcome.ABORTED), (Action.PROMOTE, "2", RolloutOutcome.PROMOTED)],
)
async def test_manual_abort_and_promote(action: str, stable: str, outcome: RolloutOutcome) -> None:
    state = (await run(RolloutState("1"), T0, Source())).state
    t = await run(state, T0 + timedelta(seconds=5), Source(), action=action)
    assert t.state.canary is None and t.state.stable_version == stable
    assert t.state.last_rollout.outcome is outcome


async def test_an_abort_before_the_canary_exists_keeps_the_rollout_from_starting() -> None:
    t = await run(RolloutState("1"), T0, Source(), action=Action.ABORT)
    assert t.state.canary is None and t.state.stable_version == "1"
    assert t.state.last_rollout.version == "2"
    assert t.state.last_rollout.outcome is RolloutOutcome.ABORTED
    assert t.action.action == "abort" and t.action.result == "Applied"
    assert {e.reason for e in t.events} == {"RolloutAborted", "RolloutActionApplied"}
    # Later ticks, without the action, still do not start version 2.
    later = await run(t.state, T0 + timedelta(minutes=1), Source())
    assert later.state.canary is None and later.action is None


async def test_an_abort_with_a_version_change_stops_both_versions() -> None:
    """abort set together with a new version mid-rollout: the running canary ends and
    the new version does not start."""
    state = (await run(RolloutState("1"), T0, Source())).state
    t = await run(state, T0 + timedelta(seconds=5), Source(), version="3", action=Action.ABORT)
    assert t.state.canary is None and t.state.stable_version == "1"
    assert (t.state.last_rollout.version, t.state.last_rollout.outcome) == (
        "3",
        RolloutOutcome.ABORTED,
    )
    assert "rollout of 2 aborted" in t.action.message and "3 aborted" in t.action.message
    later = await run(t.state, T0 + timedelta(minutes=1), Source(), version="3")
    assert later.state.canary is None


async def test_pause_holds_the_canary_and_new_rollouts_until_resume() -> None:
    state = (await run(RolloutState("1"), T0, Source())).state
    paused = await run(state, T0 + timedelta(seconds=5), Source(), action=Action.PAUSE)
    assert paused.state.paused and paused.state.canary == state.canary
    assert paused.action.result == "Applied" and paused.health.reason == "Paused"
    assert [e.reason for e in paused.events] == ["RolloutActionApplied"]
    source = Source()
    held = await run(paused.state, T0 + timedelta(minutes=5), source)
    assert held.state == paused.state and source.calls == [] and held.health.reason == "Paused"

    resumed = await run(
        held.state, T0 + timedelta(minutes=5), Source(AnalysisDecision.PASS), action="resume"
    )
    assert not resumed.state.paused and resumed.state.canary.weight == 50
    assert resumed.action.result == "Applied"

    # Paused before a rollout: the new version waits.
    idle = await run(RolloutState("1"), T0, Source(), version="1", action=Action.PAUSE)
    waiting = await run(idle.state, T0 + timedelta(seconds=5), Source())
    assert waiting.state.canary is None and waiting.health.reason == "Paused"


async def test_actions_with_nothing_to_act_on_are_ignored_and_unknown_ones_refused() -> None:
    for action in ("abort", "promote", "resume"):
        t = await run(RolloutState("1"), T0, Source(), version="1", action=action)
        assert t.state == RolloutState("1") and t.action.result == "Ignored", action
        assert [e.reason for e in t.events] == ["RolloutActionIgnored"]
    state = (await run(RolloutState("1"), T0, Source())).state
    t = await run(state, T0 + timedelta(seconds=5), Source(), action="rollback")
    assert t.state == state and t.action.action == "rollback" and t.action.result == "Refused"
    assert [(e.warning, e.reason) for e in t.events] == [(True, "RolloutActionRefused")]


async def test_promote_before_the_canary_exists_promotes_the_new_version() -> None:
    t = await run(RolloutState("1"), T0, Source(), action=Action.PROMOTE)
    assert t.state.canary is None and t.state.stable_version == "2" and t.promoted
    assert t.action.result == "Applied"


async def test_a_new_version_mid_rollout_aborts_the_old_one_then_starts() -> None:
    state = (await run(RolloutState("1"), T0, Source())).state
    t = await run(state, T0 + timedelta(seconds=5), Source(), version="3")
    assert t.state.canary is None and t.state.last_rollout.outcome is RolloutOutcome.ABORTED
    t = await run(t.state, T0 + timedelta(seconds=10), Source(), version="3")
    assert t.state.canary.version == "3" and t.state.canary.weight == 10


async def test_resuming_from_stored_state_continues_at_the_same_step() -> None:
    """What an operator restart does: rebuild the state from status and tick again."""
    source = Source(AnalysisDecision.PASS)
    state = (await run(RolloutState("1"), T0, Source())).state
    state = (await run(state, T0 + timedelta(minutes=1, seconds=1), source)).state
    stored = state.canary.to_wire()
    restored = RolloutState("1", CanaryStatus.model_validate(stored))
    t = await run(restored, T0 + timedelta(minutes=1, seconds=30), Source())
    assert (t.state.canary.step, t.state.canary.weight) == (1, 50)


async def test_a_sample_ratio_mismatch_holds_with_a_warning_and_never_promotes() -> None:
    mismatch = AnalysisDecision.SAMPLE_RATIO_MISMATCH
    source = Source(mismatch, mismatch, mismatch)
    state = (await run(RolloutState("1"), T0, source)).state
    for minute in (1, 2):
        t = await run(state, T0 + timedelta(minutes=minute, seconds=1), source)
        state = t.state
        assert state.canary is not None and state.canary.weight == 10
        assert t.events[0].warning and t.events[0].reason == "AnalysisSampleRatioMismatch"
    t = await run(state, T0 + timedelta(minutes=3, seconds=1), source)
    assert t.state.last_rollout is not None
    assert t.state.last_rollout.outcome is RolloutOutcome.ROLLED_BACK
    assert "scripted SampleRatioMismatch" in t.state.last_rollout.reason
    assert not t.promoted and t.state.stable_version == "1"


async def test_waiting_for_impressions_is_not_a_warning() -> None:
    source = Source(AnalysisDecision.WAIT)
    state = (await run(RolloutState("1"), T0, source)).state
    t = await run(state, T0 + timedelta(minutes=1, seconds=1), source)
    assert t.events[0].reason == "AnalysisWait" and not t.events[0].warning


async def test_each_step_start_is_kept_through_holds_and_a_restart() -> None:
    """The cumulative analysis reads step i's window from stepStarts[i] to stepStarts[i+1]:
    a hold restarts the interval but not the step; an advance appends its time."""
    state = (await run(RolloutState("1"), T0, Source())).state
    assert state.canary is not None and state.canary.step_starts == ["2026-01-01T12:00:00Z"]
    held = (await run(state, T0 + timedelta(minutes=1), Source(AnalysisDecision.WAIT))).state
    assert held.canary is not None and held.canary.step_starts == ["2026-01-01T12:00:00Z"]
    advanced = (await run(held, T0 + timedelta(minutes=2), Source(AnalysisDecision.PASS))).state
    assert advanced.canary is not None
    assert advanced.canary.step_starts == ["2026-01-01T12:00:00Z", "2026-01-01T12:02:00Z"]
    restored = CanaryStatus.model_validate(advanced.canary.to_wire())
    assert restored.step_starts == advanced.canary.step_starts
