"""The rollout's gates in the state machine: confirmation by a person, webhooks before the
rollout / at each analysis / before promotion, a shadow phase, and the stable's scale-up
before it takes all traffic. Webhook answers and replica counts are scripted, as the analysis is."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from recsys_operator.api.recommender_system import RolloutSpec, RolloutWebhook
from recsys_operator.api.status import (
    AnalysisDecision,
    AnalysisResult,
    CanaryPhase,
    CanaryStatus,
    RolloutOutcome,
    ShadowResult,
)
from recsys_operator.rollout.state_machine import (
    Action,
    Gates,
    RolloutState,
    ServingReplicas,
    Transition,
    tick,
)
from recsys_operator.rollout.webhooks import WebhookAnswer

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
STEP = timedelta(minutes=1, seconds=1)


def spec(**changes: Any) -> RolloutSpec:
    base = {"steps": [10, 50, 100], "interval": "1m", "progressDeadline": "30m"}
    return RolloutSpec.model_validate({**base, **changes})


def hook(name: str, type_: str, retries: int = 1) -> dict[str, Any]:
    return {"name": name, "type": type_, "url": f"http://127.0.0.1:1/{name}", "retries": retries}


async def passing(canary: CanaryStatus, window: float) -> AnalysisResult:
    return AnalysisResult(time="2026-01-01T00:00:00Z", decision=AnalysisDecision.PASS, reason="ok")


class Hooks:
    """Answers webhooks from a script per webhook name; records each call."""

    def __init__(self, **answers: list[WebhookAnswer]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, int]] = []

    async def __call__(
        self, hook: RolloutWebhook, canary: CanaryStatus, stable: str
    ) -> WebhookAnswer:
        self.calls.append((hook.name, canary.phase.value, canary.weight))
        return self.answers[hook.name].pop(0)


OK = WebhookAnswer(True, 200, "HTTP 200")
BROKEN = WebhookAnswer(False, 500, "HTTP 500: 3 of 20 smoke queries returned no items")


class Replicas:
    def __init__(self, *counts: ServingReplicas | None) -> None:
        self.counts = list(counts)

    async def __call__(self) -> ServingReplicas | None:
        return self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]


async def walk(
    rollout: RolloutSpec, gates: Gates, ticks: int, action_at: dict[int, str] | None = None
) -> list[Transition]:
    """Tick `ticks` times, one step interval apart, from the start of a rollout 1 -> 2."""
    state, out = RolloutState("1"), []
    for i in range(ticks):
        action = (action_at or {}).get(i)
        t = await tick("2", rollout, state, T0 + STEP * i, passing, action, gates)
        out.append(t)
        state = t.state
    return out


async def test_confirm_promotion_holds_a_passing_canary_until_a_person_confirms() -> None:
    ts = await walk(spec(confirmPromotion=True), Gates(), 5, action_at={4: Action.PROMOTE})
    # start 10% -> pass, 50% -> pass: holds instead of promoting, for as long as nobody acts
    held = ts[2].state.canary
    assert held is not None and held.phase is CanaryPhase.AWAITING_PROMOTION and held.weight == 50
    assert (
        ts[2].health.reason == "AwaitingPromotion" and ts[2].events[0].reason == "AwaitingPromotion"
    )
    assert ts[3].state == ts[2].state and "waiting for a person" in ts[3].health.message
    assert ts[4].promoted and ts[4].state.stable_version == "2"
    assert ts[4].state.last_rollout.reason == "confirmed by a person"


async def test_awaiting_confirmation_is_not_cut_short_by_the_progress_deadline() -> None:
    ts = await walk(spec(confirmPromotion=True), Gates(), 3)
    later = T0 + timedelta(hours=5)
    t = await tick("2", spec(confirmPromotion=True), ts[2].state, later, passing)
    assert t.state.canary is not None and t.health.reason == "AwaitingPromotion"
    aborted = await tick("2", spec(confirmPromotion=True), t.state, later, passing, Action.ABORT)
    assert aborted.state.stable_version == "1" and aborted.state.canary is None


async def test_pre_rollout_webhook_runs_before_any_traffic_and_retries_then_passes() -> None:
    hooks = Hooks(smoke=[BROKEN, OK])
    ts = await walk(spec(webhooks=[hook("smoke", "pre-rollout")]), Gates(hooks), 3)
    assert ts[0].state.canary.phase is CanaryPhase.PRE_ROLLOUT and ts[0].state.canary.weight == 0
    # First call fails: held (1 of 2 tries), at 0%, with a Warning event carrying the message.
    assert ts[1].health.reason == "WebhookRetrying" and ts[1].state.canary.weight == 0
    assert ts[1].events[0].reason == "WebhookFailed" and "3 of 20 smoke" in ts[1].events[0].message
    assert ts[1].state.canary.last_webhook.status_code == 500
    # Second call passes: the canary gets its first step.
    assert ts[2].state.canary.phase is CanaryPhase.PROGRESSING and ts[2].state.canary.weight == 10
    assert ts[2].state.canary.gate_failures == 0
    assert hooks.calls == [("smoke", "PreRollout", 0)] * 2


async def test_a_webhook_failing_past_its_retries_rolls_back_with_its_message() -> None:
    hooks = Hooks(smoke=[BROKEN, BROKEN])
    ts = await walk(spec(webhooks=[hook("smoke", "pre-rollout", retries=1)]), Gates(hooks), 3)
    last = ts[2]
    assert last.state.canary is None and last.state.stable_version == "1"
    assert last.state.last_rollout.outcome is RolloutOutcome.ROLLED_BACK
    assert "pre-rollout webhook smoke failed 2 time(s)" in last.state.last_rollout.reason
    assert "3 of 20 smoke queries" in last.state.last_rollout.reason
    assert last.health.ok is False and last.health.reason == "WebhookFailed"
    assert [e.reason for e in last.events] == ["WebhookFailed", "RolledBack"]


async def test_the_pre_rollout_webhook_waits_for_a_ready_canary_pod() -> None:
    hooks = Hooks(smoke=[OK])
    replicas = Replicas(ServingReplicas(3, 0, None), ServingReplicas(3, 1, None))
    ts = await walk(spec(webhooks=[hook("smoke", "pre-rollout")]), Gates(hooks, replicas), 3)
    assert ts[1].health.reason == "PreRollout" and "ready canary pod" in ts[1].health.message
    assert hooks.calls == [("smoke", "PreRollout", 0)]
    assert ts[2].state.canary.weight == 10


async def test_rollout_webhooks_gate_every_analysis() -> None:
    hooks = Hooks(load=[OK, BROKEN, BROKEN])
    ts = await walk(spec(webhooks=[hook("load", "rollout", retries=1)]), Gates(hooks), 4)
    assert ts[1].state.canary.weight == 50  # first analysis: webhook passed, analysis passed
    assert ts[2].health.reason == "WebhookRetrying" and ts[2].state.canary.weight == 50
    assert ts[3].state.canary is None and "rollout webhook load failed" in ts[3].health.message
    assert [(name, weight) for name, _, weight in hooks.calls] == [
        ("load", 10),
        ("load", 50),
        ("load", 50),
    ]


async def test_pre_promotion_webhook_runs_after_confirmation_and_can_roll_back() -> None:
    hooks = Hooks(check=[BROKEN])
    rollout = spec(confirmPromotion=True, webhooks=[hook("check", "pre-promotion", retries=0)])
    ts = await walk(rollout, Gates(hooks), 4, action_at={3: Action.PROMOTE})
    assert hooks.calls == [("check", "Promoting", 50)]  # not before the person confirmed
    assert ts[3].state.canary is None and ts[3].state.stable_version == "1"
    assert "pre-promotion webhook check failed" in ts[3].state.last_rollout.reason


async def test_steps_100_with_a_pre_promotion_webhook_still_calls_it() -> None:
    hooks = Hooks(check=[OK])
    ts = await walk(spec(steps=[100], webhooks=[hook("check", "pre-promotion")]), Gates(hooks), 2)
    assert ts[0].state.canary.phase is CanaryPhase.PROMOTING and ts[0].state.canary.weight == 0
    assert ts[1].promoted and hooks.calls == [("check", "Promoting", 0)]


async def test_the_stable_scales_up_before_it_takes_all_traffic() -> None:
    # At 50% the autoscaler had shrunk the stable to 2; the canary carries 3.
    replicas = Replicas(
        ServingReplicas(2, 3, 5), ServingReplicas(4, 3, 7), ServingReplicas(5, 3, 8)
    )
    ts = await walk(spec(), Gates(replicas=replicas), 5)
    scaling = ts[2]
    assert not scaling.promoted and scaling.health.reason == "ScalingUpStable"
    assert scaling.state.canary.stable_replicas_target == 5
    assert "2 of 5 replicas ready" in scaling.health.message
    assert scaling.events[0].reason == "ScalingUpStable"
    # The target stays what it was when promotion began, however the counts move.
    assert ts[3].state.canary.stable_replicas_target == 5 and not ts[3].events
    assert ts[4].promoted and ts[4].state.stable_version == "2"


async def test_fixed_replicas_promote_at_once() -> None:
    ts = await walk(spec(), Gates(replicas=Replicas(ServingReplicas(4, 1, None))), 3)
    assert ts[2].promoted


async def test_a_stable_that_never_scales_up_is_rolled_back_at_the_deadline() -> None:
    ts = await walk(spec(), Gates(replicas=Replicas(ServingReplicas(2, 3, 5))), 3)
    late = T0 + timedelta(minutes=31)
    t = await tick("2", spec(), ts[2].state, late, passing, None, Gates(replicas=Replicas(None)))
    assert t.health.reason == "ProgressDeadlineExceeded"
    assert "scaling up to 5 replicas" in t.state.last_rollout.reason


class ShadowJudge:
    def __init__(self, *decisions: AnalysisDecision) -> None:
        self.decisions = list(decisions)
        self.calls: list[tuple[str, int, float]] = []

    async def __call__(self, canary: CanaryStatus, window: float) -> ShadowResult:
        self.calls.append((canary.phase.value, canary.weight, window))
        decision = self.decisions.pop(0)
        return ShadowResult(
            time="2026-01-01T00:00:00Z", decision=decision, reason=f"scripted {decision.value}"
        )


SHADOW = {"duration": "1m", "percent": 50}


async def test_a_shadow_phase_mirrors_before_any_traffic_then_passes_to_the_first_step() -> None:
    judge = ShadowJudge(AnalysisDecision.WAIT, AnalysisDecision.PASS)
    ts = await walk(spec(shadow=SHADOW), Gates(shadow=judge), 3)
    assert ts[0].state.canary.phase is CanaryPhase.SHADOW and ts[0].state.canary.weight == 0
    assert "50% of requests mirrored" in ts[0].events[0].message
    assert ts[1].health.reason == "Shadow" and ts[1].state.canary.inconclusive_count == 1
    assert ts[1].state.canary.last_shadow.reason == "scripted Wait"
    assert ts[2].state.canary.phase is CanaryPhase.PROGRESSING and ts[2].state.canary.weight == 10
    assert ts[2].events[0].reason == "ShadowPassed"
    assert ts[2].state.canary.inconclusive_count == 0
    assert judge.calls == [("Shadow", 0, 60.0)] * 2


async def test_a_failed_shadow_rolls_back_before_any_user_saw_the_canary() -> None:
    ts = await walk(spec(shadow=SHADOW), Gates(shadow=ShadowJudge(AnalysisDecision.FAIL)), 2)
    assert ts[1].state.canary is None and ts[1].state.stable_version == "1"
    assert ts[1].health.reason == "ShadowFailed" and "before any traffic" in ts[1].health.message
    assert ts[1].state.last_rollout.reason == "shadow phase failed: scripted Fail"


async def test_shadow_comes_after_the_pre_rollout_webhooks() -> None:
    hooks = Hooks(smoke=[OK])
    rollout = spec(shadow=SHADOW, webhooks=[hook("smoke", "pre-rollout")])
    ts = await walk(rollout, Gates(hooks, shadow=ShadowJudge(AnalysisDecision.PASS)), 3)
    assert [t.state.canary.phase for t in ts] == [
        CanaryPhase.PRE_ROLLOUT,
        CanaryPhase.SHADOW,
        CanaryPhase.PROGRESSING,
    ]
