"""The progressive-rollout state machine, independent of Kubernetes.

A rollout is a linear pipeline of idempotent steps driven by ticks:

  start (canary at steps[0]) -> [wait interval -> analyse -> advance | hold | roll back]* -> promote

All state lives in `RolloutState` (stored in the resource's status), so a
restarted operator resumes at the same step with the same weight. `tick` only
decides; the caller stores the new state, routes traffic and records events.
The metrics source is injected, so local mode and the operator share this code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from recsys_contracts.api_base import parse_duration
from recsys_operator.api.recommender_system import RolloutSpec
from recsys_operator.api.status import (
    AnalysisDecision,
    AnalysisResult,
    CanaryStatus,
    RolloutOutcome,
    RolloutRecord,
)

AnalysisSource = Callable[[CanaryStatus, float], Awaitable[AnalysisResult]]
"""Analyse the canary over the last `window` seconds."""


class Action:
    """Manual controls (annotation `recsys.dev/rollout-action`)."""

    ABORT = "abort"
    PROMOTE = "promote"


@dataclass(frozen=True)
class RolloutState:
    stable_version: str
    canary: CanaryStatus | None = None
    last_rollout: RolloutRecord | None = None


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


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _parse(text: str | None, default: datetime) -> datetime:
    if not text:
        return default
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


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
        time=_iso(now),
        reason=reason,
        last_analysis=analysis,
    )
    stable = state.canary.version if outcome is RolloutOutcome.PROMOTED else state.stable_version
    return RolloutState(stable_version=stable, canary=None, last_rollout=record)


async def tick(
    desired_version: str,
    spec: RolloutSpec,
    state: RolloutState,
    now: datetime,
    analysis_source: AnalysisSource,
    action: str | None = None,
) -> Transition:
    """One step of the rollout of `desired_version` (the spec's model version)."""
    canary = state.canary

    # No rollout in progress.
    if canary is None:
        if desired_version == state.stable_version:
            return Transition(
                state, Health(True, "Stable", f"serving version {state.stable_version}")
            )
        last = state.last_rollout
        if last and last.version == desired_version and last.outcome is not RolloutOutcome.PROMOTED:
            # Do not retry a version that failed; a new version (or a spec revert) moves on.
            return Transition(
                state,
                Health(
                    False, "RolledBack", f"version {desired_version} was rolled back: {last.reason}"
                ),
            )
        if spec.steps == [100]:
            # No canary steps asked for: switch at once (a blue/green without analysis).
            canary_state = replace(
                state,
                canary=CanaryStatus(version=desired_version, weight=100, started_at=_iso(now)),
            )
            new = _finish(
                canary_state, RolloutOutcome.PROMOTED, "steps is [100]: no canary phase", now, None
            )
            message = f"version {desired_version} promoted directly (rollout.steps is [100])"
            return Transition(
                new,
                Health(True, "Promoted", message),
                [Event(False, "RolloutPromoted", message)],
                promoted=True,
            )
        started = CanaryStatus(
            version=desired_version,
            weight=spec.steps[0],
            step=0,
            started_at=_iso(now),
            step_started_at=_iso(now),
            step_starts=[_iso(now)],
        )
        message = f"rollout of {desired_version} started at {spec.steps[0]}% (stable {state.stable_version})"
        return Transition(
            replace(state, canary=started),
            Health(True, "Progressing", message),
            [Event(False, "RolloutStarted", message)],
        )

    # The spec moved on while a rollout ran: stop this one; the next tick starts the new one.
    if desired_version != canary.version:
        reason = f"spec now asks for version {desired_version}"
        new = _finish(state, RolloutOutcome.ABORTED, reason, now, canary.last_analysis)
        return Transition(
            new,
            Health(True, "Aborted", f"rollout of {canary.version} aborted: {reason}"),
            [Event(False, "RolloutAborted", f"rollout of {canary.version} aborted: {reason}")],
        )

    if action == Action.ABORT:
        new = _finish(
            state, RolloutOutcome.ABORTED, "aborted by a person", now, canary.last_analysis
        )
        message = f"rollout of {canary.version} aborted by a person; all traffic on {state.stable_version}"
        return Transition(
            new, Health(False, "Aborted", message), [Event(True, "RolloutAborted", message)]
        )
    if action == Action.PROMOTE:
        new = _finish(
            state, RolloutOutcome.PROMOTED, "promoted by a person", now, canary.last_analysis
        )
        message = f"version {canary.version} promoted by a person"
        return Transition(
            new,
            Health(True, "Promoted", message),
            [Event(False, "RolloutPromoted", message)],
            promoted=True,
        )

    started_at = _parse(canary.started_at, now)
    if (now - started_at).total_seconds() > parse_duration(spec.progress_deadline):
        reason = f"not finished within progressDeadline {spec.progress_deadline} (at step {canary.step}, {canary.weight}%)"
        new = _finish(state, RolloutOutcome.ROLLED_BACK, reason, now, canary.last_analysis)
        return Transition(
            new,
            Health(False, "ProgressDeadlineExceeded", reason),
            [Event(True, "RolledBack", reason)],
        )

    if spec.paused:
        return Transition(
            state, Health(True, "Paused", f"paused at step {canary.step} ({canary.weight}%)")
        )

    step_started = _parse(canary.step_started_at, now)
    interval = parse_duration(spec.interval)
    waited = (now - step_started).total_seconds()
    if waited < interval:
        due = _iso(step_started + timedelta(seconds=interval))
        return Transition(
            state,
            Health(
                True, "Progressing", f"step {canary.step} at {canary.weight}%: analysis at {due}"
            ),
        )

    analysis = await analysis_source(canary, interval)
    analysed = canary.model_copy(update={"last_analysis": analysis})
    summary = (
        f"step {canary.step} at {canary.weight}%: {analysis.decision.value}: {analysis.reason}"
    )

    if analysis.decision is AnalysisDecision.PASS:
        # Passing the step before 100% promotes: at 100% no stable traffic is left to compare with.
        if canary.step + 1 >= len(spec.steps) or spec.steps[canary.step + 1] == 100:
            new = _finish(
                replace(state, canary=analysed),
                RolloutOutcome.PROMOTED,
                analysis.reason,
                now,
                analysis,
            )
            message = f"version {canary.version} promoted: {analysis.reason}"
            return Transition(
                new,
                Health(True, "Promoted", message),
                [Event(False, "RolloutPromoted", message)],
                promoted=True,
            )
        weight = spec.steps[canary.step + 1]
        advanced = analysed.model_copy(
            update={
                "step": canary.step + 1,
                "weight": weight,
                "step_started_at": _iso(now),
                "inconclusive_count": 0,
                "step_starts": [*canary.step_starts, _iso(now)],
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
            held = analysed.model_copy(update={"step_started_at": _iso(now)})
            message = f"{summary}; autoRollback is off: holding at {canary.weight}% for a person to decide"
            return Transition(
                replace(state, canary=held),
                Health(False, "AnalysisFailed", message),
                [Event(True, "AnalysisFailed", message)],
            )
        new = _finish(
            replace(state, canary=analysed),
            RolloutOutcome.ROLLED_BACK,
            analysis.reason,
            now,
            analysis,
        )
        message = f"version {canary.version} rolled back: {analysis.reason}"
        return Transition(
            new, Health(False, "RolledBack", message), [Event(True, "RolledBack", message)]
        )

    # Inconclusive, Wait or SampleRatioMismatch: hold this step and try again after
    # another interval (the analysis source then looks at the whole step so far).
    count = canary.inconclusive_count + 1
    if count > spec.max_inconclusive:
        reason = f"{count} inconclusive analyses in a row (max {spec.max_inconclusive}); last: {analysis.reason}"
        new = _finish(
            replace(state, canary=analysed), RolloutOutcome.ROLLED_BACK, reason, now, analysis
        )
        return Transition(
            new,
            Health(False, "RolledBack", f"version {canary.version} rolled back: {reason}"),
            [Event(True, "RolledBack", reason)],
        )
    held = analysed.model_copy(update={"inconclusive_count": count, "step_started_at": _iso(now)})
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
