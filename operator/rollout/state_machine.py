"""The progressive-rollout state machine, independent of Kubernetes.

A rollout is a linear pipeline of idempotent steps driven by ticks:

  start -> [pre-rollout webhooks] -> [shadow: mirrored traffic only] -> canary at steps[0]
        -> [wait interval -> rollout webhooks -> analyse -> advance | hold | roll back]*
        -> [a person confirms] -> [pre-promotion webhooks] -> [stable scaled up] -> promote

(the bracketed gates only when spec.rollout asks for them; `status.canary.phase` says
where a rollout is). All state lives in `RolloutState` (stored in the resource's status), so a
restarted operator resumes at the same step with the same weight. `tick` only
decides; the caller stores the new state, routes traffic and records events.
The metrics source, the webhook caller and the serving replica counts are injected,
so local mode and the operator share this code and tests script them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum

from recsys_contracts.api_base import parse_duration
from recsys_operator.api.reasons import EventReason
from recsys_operator.api.recommender_system import RolloutSpec, RolloutWebhook, WebhookType
from recsys_operator.api.status import (
    AnalysisDecision,
    AnalysisResult,
    CanaryPhase,
    CanaryStatus,
    RolloutActionRecord,
    RolloutActionResult,
    RolloutOutcome,
    RolloutRecord,
    ShadowResult,
    WebhookResult,
    parse_rfc3339,
    rfc3339,
)
from recsys_operator.rollout.webhooks import WebhookCaller, no_webhooks

AnalysisSource = Callable[[CanaryStatus, float], Awaitable[AnalysisResult]]
"""Analyse the canary over the last `window` seconds."""

ShadowSource = Callable[[CanaryStatus, float], Awaitable[ShadowResult]]
"""Judge the canary's shadow answers over the last `window` seconds."""


@dataclass(frozen=True)
class ServingReplicas:
    """Ready serving pods per track, and what the stable needs before it takes all traffic."""

    stable_ready: int
    canary_ready: int
    stable_needed: int | None
    """None: the stable's replicas are fixed and already carry everything (nothing to scale)."""


ReplicaSource = Callable[[], Awaitable[ServingReplicas | None]]
"""The serving replicas now; None where nobody counts them (local mode)."""


class Action(StrEnum):
    """Manual controls (annotation `recsys.dev/rollout-action`, locally the run
    folder's rollout-action file). Each is acted on by the one tick that sees it, in
    any phase, and acknowledged in `Transition.action` and an Event."""

    ABORT = "abort"
    """End the running rollout, or keep the version the spec names from starting."""
    PROMOTE = "promote"
    """Skip the remaining steps and analyses (not the pre-promotion gates)."""
    PAUSE = "pause"
    """Hold the running rollout where it is, and start no new one, until resume."""
    RESUME = "resume"
    """Lift a pause."""


@dataclass(frozen=True)
class RolloutState:
    stable_version: str
    canary: CanaryStatus | None = None
    last_rollout: RolloutRecord | None = None
    paused: bool = False
    """Paused by a person's action (in a cluster: `status.lastAction` is an applied pause)."""


@dataclass(frozen=True)
class Health:
    ok: bool | None
    reason: str
    message: str


@dataclass(frozen=True)
class Event:
    warning: bool
    reason: str
    message: str


@dataclass
class Transition:
    state: RolloutState
    health: Health
    events: list[Event] = field(default_factory=list)
    promoted: bool = False  # the canary became stable in this tick
    action: RolloutActionRecord | None = None  # the person's action this tick acted on


@dataclass(frozen=True)
class Gates:
    """The rollout's I/O besides the analysis: webhooks and replica counts."""

    webhooks: WebhookCaller = no_webhooks
    replicas: ReplicaSource | None = None
    shadow: ShadowSource | None = None


def _parse(text: str | None, default: datetime) -> datetime:
    return parse_rfc3339(text) if text else default


def _finish(
    state: RolloutState,
    outcome: RolloutOutcome,
    reason: str,
    now: datetime,
    analysis: AnalysisResult | None,
) -> RolloutState:
    assert state.canary is not None
    record = RolloutRecord(
        version=state.canary.version,
        outcome=outcome,
        time=rfc3339(now),
        reason=reason,
        last_analysis=analysis,
    )
    stable = state.canary.version if outcome is RolloutOutcome.PROMOTED else state.stable_version
    return RolloutState(stable_version=stable, canary=None, last_rollout=record)


def _end(
    state: RolloutState,
    outcome: RolloutOutcome,
    reason: str,
    now: datetime,
    analysis: AnalysisResult | None,
    health: Health,
    *events: Event,
) -> Transition:
    """The transition that finishes the rollout in `state`: recorded in `last_rollout`
    with `reason`, reported as `health`, announced by `events`."""
    return Transition(
        _finish(state, outcome, reason, now, analysis),
        health,
        list(events),
        promoted=outcome is RolloutOutcome.PROMOTED,
    )


async def tick(
    desired_version: str,
    spec: RolloutSpec,
    state: RolloutState,
    now: datetime,
    analysis_source: AnalysisSource,
    action: str | None = None,
    gates: Gates | None = None,
) -> Transition:
    """One step of the rollout of `desired_version` (the spec's model version), acting
    first on `action`, a person's request, if one was made (any string: an unknown one
    is refused, and the tick goes on as without it)."""
    gates = gates or Gates()
    if action is None:
        return await _tick(desired_version, spec, state, now, analysis_source, gates)
    if action not in set(Action):
        transition = await _tick(desired_version, spec, state, now, analysis_source, gates)
        message = (
            f"unknown rollout action {action!r} refused: use one of "
            f"{', '.join(a.value for a in Action)}"
        )
        return _acknowledged(transition, action, RolloutActionResult.REFUSED, message, now)
    return await _act(Action(action), desired_version, spec, state, now, analysis_source, gates)


async def _tick(
    desired_version: str,
    spec: RolloutSpec,
    state: RolloutState,
    now: datetime,
    analysis_source: AnalysisSource,
    gates: Gates,
) -> Transition:
    canary = state.canary

    if canary is None:
        if state.paused and _startable(desired_version, state):
            return Transition(
                state,
                Health(
                    True,
                    "Paused",
                    f"version {desired_version} waits: rollouts paused by a person "
                    "(recsys.dev/rollout-action=resume)",
                ),
            )
        return _start(desired_version, spec, state, now)

    # The spec moved on while a rollout ran: stop this one; the next tick starts the new one.
    if desired_version != canary.version:
        reason = f"spec now asks for version {desired_version}"
        message = f"rollout of {canary.version} aborted: {reason}"
        return _end(
            state,
            RolloutOutcome.ABORTED,
            reason,
            now,
            canary.last_analysis,
            Health(True, "Aborted", message),
            Event(False, "RolloutAborted", message),
        )

    started_at = _parse(canary.started_at, now)
    if canary.phase is not CanaryPhase.AWAITING_PROMOTION and (
        now - started_at
    ).total_seconds() > parse_duration(spec.progress_deadline):
        reason = f"not finished within progressDeadline {spec.progress_deadline} (at step {canary.step}, {canary.weight}%, phase {canary.phase.value})"
        if canary.stable_replicas_target is not None:
            reason += f"; the stable was scaling up to {canary.stable_replicas_target} replicas"
        return _end(
            state,
            RolloutOutcome.ROLLED_BACK,
            reason,
            now,
            canary.last_analysis,
            Health(False, "ProgressDeadlineExceeded", reason),
            Event(True, "RolledBack", reason),
        )

    if spec.paused or state.paused:
        by = "by a person (recsys.dev/rollout-action=resume)" if state.paused else "by the spec"
        return Transition(
            state,
            Health(True, "Paused", f"paused {by} at step {canary.step} ({canary.weight}%)"),
        )

    if canary.phase is CanaryPhase.PRE_ROLLOUT:
        return await _pre_rollout(state, canary, spec, now, gates)
    if canary.phase is CanaryPhase.SHADOW:
        return await _shadow(state, canary, spec, now, gates)
    if canary.phase is CanaryPhase.AWAITING_PROMOTION:
        since = canary.step_started_at or "?"
        message = (
            f"version {canary.version} passed its analyses and holds at {canary.weight}% "
            f"since {since}, waiting for a person to confirm the promotion "
            "(recsys.dev/rollout-action=promote, or abort)"
        )
        return Transition(state, Health(True, "AwaitingPromotion", message))
    if canary.phase is CanaryPhase.PROMOTING:
        reason = canary.promotion_reason or "promotion gates passed"
        return await _promote(state, canary, spec, now, gates, reason, canary.last_analysis)

    step_started = _parse(canary.step_started_at, now)
    interval = parse_duration(spec.interval)
    waited = (now - step_started).total_seconds()
    if waited < interval:
        due = rfc3339(step_started + timedelta(seconds=interval))
        return Transition(
            state,
            Health(
                True, "Progressing", f"step {canary.step} at {canary.weight}%: analysis at {due}"
            ),
        )

    hooks = spec.webhooks_of(WebhookType.ROLLOUT)
    if hooks:
        gate = await _run_gate(hooks, state, canary, now, gates.webhooks)
        if not gate.passed:
            return gate.transition
        canary = gate.canary

    analysis = await analysis_source(canary, interval)
    analysed = canary.model_copy(update={"last_analysis": analysis})
    summary = (
        f"step {canary.step} at {canary.weight}%: {analysis.decision.value}: {analysis.reason}"
    )

    if analysis.decision is AnalysisDecision.PASS:
        # Passing the step before 100% promotes: at 100% no stable traffic is left to compare with.
        if canary.step + 1 >= len(spec.steps) or spec.steps[canary.step + 1] == 100:
            if spec.confirm_promotion:
                held = analysed.model_copy(
                    update={
                        "phase": CanaryPhase.AWAITING_PROMOTION,
                        "step_started_at": rfc3339(now),
                        "inconclusive_count": 0,
                    }
                )
                message = (
                    f"{summary}; holding at {canary.weight}% until a person confirms the "
                    "promotion (recsys.dev/rollout-action=promote)"
                )
                return Transition(
                    replace(state, canary=held),
                    Health(True, "AwaitingPromotion", message),
                    [Event(False, "AwaitingPromotion", message)],
                )
            return await _promote(
                replace(state, canary=analysed),
                analysed,
                spec,
                now,
                gates,
                analysis.reason,
                analysis,
            )
        weight = spec.steps[canary.step + 1]
        advanced = analysed.model_copy(
            update={
                "step": canary.step + 1,
                "weight": weight,
                "step_started_at": rfc3339(now),
                "inconclusive_count": 0,
                "step_starts": [*canary.step_starts, rfc3339(now)],
            }
        )
        message = f"{summary}; advancing to {weight}%"
        return Transition(
            replace(state, canary=advanced),
            Health(True, "Progressing", message),
            [Event(False, "RolloutAdvanced", message)],
        )

    if analysis.decision is AnalysisDecision.FAIL:
        if not spec.auto_rollback:
            held = analysed.model_copy(update={"step_started_at": rfc3339(now)})
            message = f"{summary}; autoRollback is off: holding at {canary.weight}% for a person to decide"
            return Transition(
                replace(state, canary=held),
                Health(False, "AnalysisFailed", message),
                [Event(True, "AnalysisFailed", message)],
            )
        message = f"version {canary.version} rolled back: {analysis.reason}"
        return _end(
            replace(state, canary=analysed),
            RolloutOutcome.ROLLED_BACK,
            analysis.reason,
            now,
            analysis,
            Health(False, "RolledBack", message),
            Event(True, "RolledBack", message),
        )

    # Inconclusive, Wait or SampleRatioMismatch: hold this step and try again after
    # another interval (the analysis source then looks at the whole step so far).
    count = canary.inconclusive_count + 1
    if count > spec.max_inconclusive:
        reason = f"{count} inconclusive analyses in a row (max {spec.max_inconclusive}); last: {analysis.reason}"
        return _end(
            replace(state, canary=analysed),
            RolloutOutcome.ROLLED_BACK,
            reason,
            now,
            analysis,
            Health(False, "RolledBack", f"version {canary.version} rolled back: {reason}"),
            Event(True, "RolledBack", reason),
        )
    held = analysed.model_copy(
        update={"inconclusive_count": count, "step_started_at": rfc3339(now)}
    )
    message = f"{summary}; holding at {canary.weight}% ({count}/{spec.max_inconclusive})"
    return Transition(
        replace(state, canary=held),
        Health(True, "Progressing", message),
        [
            Event(
                analysis.decision is not AnalysisDecision.WAIT,
                f"Analysis{analysis.decision.value}",
                message,
            )
        ],
    )


# --- a person's actions --------------------------------------------------------------


def _startable(desired_version: str, state: RolloutState) -> bool:
    """A rollout of `desired_version` would start now (with no canary running): a new
    version, not one that was aborted or rolled back (see `_start`)."""
    last = state.last_rollout
    retried = (
        last is not None
        and last.version == desired_version
        and last.outcome is not RolloutOutcome.PROMOTED
    )
    return desired_version != state.stable_version and not retried


def _acknowledged(
    transition: Transition,
    action: str,
    result: RolloutActionResult,
    message: str,
    now: datetime,
) -> Transition:
    """`transition` with the action's record and the Event that acknowledges it."""
    reason = {
        RolloutActionResult.APPLIED: EventReason.ROLLOUT_ACTION_APPLIED,
        RolloutActionResult.IGNORED: EventReason.ROLLOUT_ACTION_IGNORED,
        RolloutActionResult.REFUSED: EventReason.ROLLOUT_ACTION_REFUSED,
    }[result]
    warning = result is RolloutActionResult.REFUSED
    transition.events.append(Event(warning, reason, message))
    transition.action = RolloutActionRecord(
        action=action[:63], result=result, message=message, time=rfc3339(now)
    )
    return transition


async def _act(
    action: Action,
    desired_version: str,
    spec: RolloutSpec,
    state: RolloutState,
    now: datetime,
    analysis_source: AnalysisSource,
    gates: Gates,
) -> Transition:
    """Act on a person's request in whatever phase the rollout is, or before one."""
    applied, ignored = RolloutActionResult.APPLIED, RolloutActionResult.IGNORED
    canary = state.canary
    pending = canary is None and _startable(desired_version, state)

    if action is Action.PAUSE:
        paused = replace(state, paused=True)
        transition = await _tick(desired_version, spec, paused, now, analysis_source, gates)
        where = (
            f"at step {canary.step} ({canary.weight}%) of version {canary.version}"
            if canary is not None
            else "before any rollout: no new rollout starts"
        )
        return _acknowledged(transition, action, applied, f"rollouts paused {where}", now)

    if action is Action.RESUME:
        if not state.paused:
            transition = await _tick(desired_version, spec, state, now, analysis_source, gates)
            return _acknowledged(transition, action, ignored, "nothing to resume: not paused", now)
        resumed = replace(state, paused=False)
        transition = await _tick(desired_version, spec, resumed, now, analysis_source, gates)
        return _acknowledged(transition, action, applied, "rollouts resumed", now)

    if action is Action.ABORT:
        if canary is None and not pending:
            transition = await _tick(desired_version, spec, state, now, analysis_source, gates)
            return _acknowledged(transition, action, ignored, "no rollout to abort", now)
        # The rollout that runs (if one does) ends; if the spec names a version that has
        # not started, that version is recorded as aborted, so it never starts.
        stopped = f"rollout of {canary.version} aborted by a person" if canary else ""
        if desired_version != state.stable_version and (
            canary is None or canary.version != desired_version
        ):
            before = f"version {desired_version} aborted by a person before it started"
            record = RolloutRecord(
                version=desired_version,
                outcome=RolloutOutcome.ABORTED,
                time=rfc3339(now),
                reason="aborted by a person before it started",
            )
            new = RolloutState(state.stable_version, canary=None, last_rollout=record)
            message = "; ".join(m for m in (stopped, before) if m)
        else:
            assert canary is not None
            new = _finish(
                state, RolloutOutcome.ABORTED, "aborted by a person", now, canary.last_analysis
            )
            message = stopped
        message += f"; all traffic on {state.stable_version}"
        transition = Transition(
            new, Health(False, "Aborted", message), [Event(True, "RolloutAborted", message)]
        )
        return _acknowledged(transition, action, applied, message, now)

    # Promote: a person's promotion skips the remaining steps and analyses (or confirms
    # a canary awaiting promotion), not the pre-promotion webhooks or the scale-up.
    unpaused = replace(state, paused=False)
    if canary is not None and canary.version == desired_version:
        confirmed = (
            "confirmed by a person"
            if canary.phase is CanaryPhase.AWAITING_PROMOTION
            else "promoted by a person"
        )
        transition = await _promote(
            unpaused, canary, spec, now, gates, confirmed, canary.last_analysis
        )
        return _acknowledged(transition, action, applied, f"{canary.version} {confirmed}", now)
    if pending:
        # No canary yet: start the rollout and promote it in the same tick.
        started = _start(desired_version, spec, unpaused, now)
        if started.state.canary is None:  # steps [100]: promoted already
            return _acknowledged(started, action, applied, f"{desired_version} promoted", now)
        promoted = await _promote(
            started.state,
            started.state.canary,
            spec,
            now,
            gates,
            "promoted by a person before its canary steps",
            None,
        )
        promoted.events[:0] = started.events
        message = f"{desired_version} promoted by a person before its canary steps"
        return _acknowledged(promoted, action, applied, message, now)
    transition = await _tick(desired_version, spec, state, now, analysis_source, gates)
    return _acknowledged(
        transition, action, ignored, "no rollout of the spec's version to promote", now
    )


def _start(
    desired_version: str, spec: RolloutSpec, state: RolloutState, now: datetime
) -> Transition:
    """No rollout in progress: stay, or start one at its first phase."""
    if desired_version == state.stable_version:
        return Transition(state, Health(True, "Stable", f"serving version {state.stable_version}"))
    last = state.last_rollout
    if last and last.version == desired_version and last.outcome is not RolloutOutcome.PROMOTED:
        # Do not retry a version that failed; a new version (or a spec revert) moves on.
        return Transition(
            state,
            Health(
                False, "RolledBack", f"version {desired_version} was rolled back: {last.reason}"
            ),
        )
    if spec.webhooks_of(WebhookType.PRE_ROLLOUT):
        # The canary's pods start, without traffic, for the smoke tests.
        started = CanaryStatus(
            version=desired_version,
            weight=0,
            step=0,
            started_at=rfc3339(now),
            step_started_at=rfc3339(now),
            phase=CanaryPhase.PRE_ROLLOUT,
        )
        message = f"rollout of {desired_version} started: pre-rollout webhooks before any traffic (stable {state.stable_version})"
        return Transition(
            replace(state, canary=started),
            Health(True, "PreRollout", message),
            [Event(False, "RolloutStarted", message)],
        )
    if spec.shadow is not None:
        return _enter_shadow(
            state, CanaryStatus(version=desired_version, started_at=rfc3339(now)), spec, now
        )
    if spec.steps == [100] and not _has_promotion_gates(spec):
        # No canary steps asked for: switch at once (a blue/green without analysis).
        canary_state = replace(
            state,
            canary=CanaryStatus(version=desired_version, weight=100, started_at=rfc3339(now)),
        )
        message = f"version {desired_version} promoted directly (rollout.steps is [100])"
        return _end(
            canary_state,
            RolloutOutcome.PROMOTED,
            "steps is [100]: no canary phase",
            now,
            None,
            Health(True, "Promoted", message),
            Event(False, "RolloutPromoted", message),
        )
    return _first_step(
        state, CanaryStatus(version=desired_version, started_at=rfc3339(now)), spec, now
    )


# --- gates ------------------------------------------------------------------------


def _has_promotion_gates(spec: RolloutSpec) -> bool:
    return spec.confirm_promotion or bool(spec.webhooks_of(WebhookType.PRE_PROMOTION))


def _first_step(
    state: RolloutState, canary: CanaryStatus, spec: RolloutSpec, now: datetime
) -> Transition:
    """The canary gets its first share of traffic (or, for steps [100], goes to promotion)."""
    if spec.steps == [100]:
        # Only reached with promotion gates: they run on the next tick.
        promoting = canary.model_copy(
            update={"phase": CanaryPhase.PROMOTING, "weight": 0, "step_started_at": rfc3339(now)}
        )
        message = f"rollout of {canary.version}: steps is [100], promotion gates next"
        return Transition(
            replace(state, canary=promoting),
            Health(True, "Promoting", message),
            [Event(False, "RolloutStarted", message)],
        )
    started = canary.model_copy(
        update={
            "phase": CanaryPhase.PROGRESSING,
            "weight": spec.steps[0],
            "step": 0,
            "step_started_at": rfc3339(now),
            # Where each step's window begins: later looks combine every step so far.
            "step_starts": [rfc3339(now)],
        }
    )
    message = (
        f"rollout of {canary.version} started at {spec.steps[0]}% (stable {state.stable_version})"
    )
    return Transition(
        replace(state, canary=started),
        Health(True, "Progressing", message),
        [Event(False, "RolloutStarted", message)],
    )


async def _pre_rollout(
    state: RolloutState, canary: CanaryStatus, spec: RolloutSpec, now: datetime, gates: Gates
) -> Transition:
    if gates.replicas is not None:
        replicas = await gates.replicas()
        if replicas is not None and replicas.canary_ready == 0:
            return Transition(
                state,
                Health(
                    True,
                    "PreRollout",
                    f"waiting for a ready canary pod of {canary.version} before the pre-rollout webhooks",
                ),
            )
    gate = await _run_gate(
        spec.webhooks_of(WebhookType.PRE_ROLLOUT), state, canary, now, gates.webhooks
    )
    if not gate.passed:
        return gate.transition
    moved = (
        _enter_shadow(state, gate.canary, spec, now)
        if spec.shadow is not None
        else _first_step(state, gate.canary, spec, now)
    )
    moved.events[0] = Event(
        False, "RolloutAdvanced", f"pre-rollout webhooks passed; {moved.events[0].message}"
    )
    return moved


def _enter_shadow(
    state: RolloutState, canary: CanaryStatus, spec: RolloutSpec, now: datetime
) -> Transition:
    assert spec.shadow is not None
    shadowing = canary.model_copy(
        update={"phase": CanaryPhase.SHADOW, "weight": 0, "step_started_at": rfc3339(now)}
    )
    message = (
        f"rollout of {canary.version}: shadow phase, {spec.shadow.percent}% of requests "
        f"mirrored to the canary for {spec.shadow.duration}, no user traffic (stable {state.stable_version})"
    )
    return Transition(
        replace(state, canary=shadowing),
        Health(True, "Shadow", message),
        [Event(False, "RolloutStarted", message)],
    )


async def _shadow(
    state: RolloutState, canary: CanaryStatus, spec: RolloutSpec, now: datetime, gates: Gates
) -> Transition:
    """Mirror for `shadow.duration`, then judge: pass to the first step, fail to roll back,
    or mirror for another duration (bounded by maxInconclusive, as the analysis is)."""
    assert spec.shadow is not None
    window = parse_duration(spec.shadow.duration)
    started = _parse(canary.step_started_at, now)
    if (now - started).total_seconds() < window:
        due = rfc3339(started + timedelta(seconds=window))
        return Transition(
            state,
            Health(
                True,
                "Shadow",
                f"canary {canary.version} answers {spec.shadow.percent}% of requests mirrored, unseen; compared at {due}",
            ),
        )
    if gates.shadow is not None:
        result = await gates.shadow(canary, window)
    else:
        result = ShadowResult(
            time=rfc3339(now),
            decision=AnalysisDecision.INCONCLUSIVE,
            reason="this rollout driver cannot judge a shadow phase",
        )
    judged = canary.model_copy(update={"last_shadow": result})
    summary = f"shadow: {result.decision.value}: {result.reason}"
    if result.decision is AnalysisDecision.PASS:
        moved = _first_step(state, judged.model_copy(update={"inconclusive_count": 0}), spec, now)
        moved.events[0] = Event(False, "ShadowPassed", f"{summary}; {moved.events[0].message}")
        return moved
    if result.decision is AnalysisDecision.FAIL:
        reason = f"shadow phase failed: {result.reason}"
        message = f"version {canary.version} rolled back before any traffic: {reason}"
        return _end(
            replace(state, canary=judged),
            RolloutOutcome.ROLLED_BACK,
            reason,
            now,
            None,
            Health(False, "ShadowFailed", message),
            Event(True, "RolledBack", message),
        )
    count = canary.inconclusive_count + 1
    if count > spec.max_inconclusive:
        reason = f"{count} shadow judgements without a decision in a row (max {spec.max_inconclusive}); last: {result.reason}"
        return _end(
            replace(state, canary=judged),
            RolloutOutcome.ROLLED_BACK,
            reason,
            now,
            None,
            Health(False, "RolledBack", f"version {canary.version} rolled back: {reason}"),
            Event(True, "RolledBack", reason),
        )
    held = judged.model_copy(update={"inconclusive_count": count, "step_started_at": rfc3339(now)})
    message = (
        f"{summary}; mirroring for another {spec.shadow.duration} ({count}/{spec.max_inconclusive})"
    )
    return Transition(
        replace(state, canary=held),
        Health(True, "Shadow", message),
        [
            Event(
                result.decision is AnalysisDecision.INCONCLUSIVE,
                f"Shadow{result.decision.value}",
                message,
            )
        ],
    )


async def _promote(
    state: RolloutState,
    canary: CanaryStatus,
    spec: RolloutSpec,
    now: datetime,
    gates: Gates,
    reason: str,
    analysis: AnalysisResult | None,
) -> Transition:
    """Promotion through its gates: pre-promotion webhooks, then a stable big enough
    for all the traffic. Each gate that cannot pass yet holds in phase Promoting."""
    promoting = canary.model_copy(
        update={"phase": CanaryPhase.PROMOTING, "promotion_reason": reason}
    )
    state = replace(state, canary=promoting)
    if promoting.stable_replicas_target is None:  # the webhooks have not all passed yet
        hooks = spec.webhooks_of(WebhookType.PRE_PROMOTION)
        if hooks:
            gate = await _run_gate(hooks, state, promoting, now, gates.webhooks)
            if not gate.passed:
                return gate.transition
            promoting = gate.canary
            state = replace(state, canary=promoting)
    replicas = await gates.replicas() if gates.replicas is not None else None
    if replicas is not None and replicas.stable_needed is not None:
        target = promoting.stable_replicas_target or max(1, replicas.stable_needed)
        if replicas.stable_ready < target:
            scaling = promoting.model_copy(update={"stable_replicas_target": target})
            message = (
                f"version {canary.version} is being promoted: the stable has "
                f"{replicas.stable_ready} of {target} replicas ready; it takes all traffic "
                "once they are"
            )
            events = (
                [Event(False, "ScalingUpStable", message)]
                if promoting.stable_replicas_target is None
                else []
            )
            return Transition(
                replace(state, canary=scaling), Health(True, "ScalingUpStable", message), events
            )
    message = f"version {canary.version} promoted: {reason}"
    return _end(
        state,
        RolloutOutcome.PROMOTED,
        reason,
        now,
        analysis,
        Health(True, "Promoted", message),
        Event(False, "RolloutPromoted", message),
    )


@dataclass
class _Gate:
    passed: bool
    canary: CanaryStatus  # with the webhook results recorded
    transition: Transition  # what to return when the gate did not pass


async def _run_gate(
    hooks: list[RolloutWebhook],
    state: RolloutState,
    canary: CanaryStatus,
    now: datetime,
    call: WebhookCaller,
) -> _Gate:
    """Call the gate's webhooks in order; the first failure stops the gate.

    A failure within the webhook's `retries` holds (the next tick calls again);
    one past them rolls the rollout back with the webhook's message."""
    for hook in hooks:
        answer = await call(hook, canary, state.stable_version)
        failures = 0 if answer.passed else canary.gate_failures + 1
        result = WebhookResult(
            name=hook.name,
            type=hook.type.value,
            time=rfc3339(now),
            passed=answer.passed,
            status_code=answer.status_code,
            message=answer.message,
            failures=failures,
        )
        canary = canary.model_copy(update={"last_webhook": result, "gate_failures": failures})
        if answer.passed:
            continue
        what = f"{hook.type.value} webhook {hook.name} failed ({failures} of {hook.retries + 1} tries): {answer.message}"
        if failures > hook.retries:
            reason = f"{hook.type.value} webhook {hook.name} failed {failures} time(s) in a row: {answer.message}"
            message = f"version {canary.version} rolled back: {reason}"
            ended = _end(
                replace(state, canary=canary),
                RolloutOutcome.ROLLED_BACK,
                reason,
                now,
                canary.last_analysis,
                Health(False, "WebhookFailed", message),
                Event(True, "WebhookFailed", what),
                Event(True, "RolledBack", message),
            )
            return _Gate(False, canary, ended)
        held = replace(state, canary=canary)
        return _Gate(
            False,
            canary,
            Transition(
                held,
                Health(True, "WebhookRetrying", f"{what}; calling again at the next tick"),
                [Event(True, "WebhookFailed", what)],
            ),
        )
    # A passed gate's transition is never returned; the caller goes on with `canary`.
    passed = Health(True, "Progressing", "webhooks passed")
    return _Gate(True, canary, Transition(replace(state, canary=canary), passed))
