"""The rollout driver: one tick of a system's rollout, from deciding to moving traffic.

The same driver runs in the operator (the Kopf timer, `controller/rollout_driver.py`)
and in local mode (`local/rollout.py`); only the two interfaces it is given differ,
after Flagger's scheduler, which drives every canary through a mesh router and a
metrics provider:

- a `TrafficRouter` makes a version servable before it takes traffic and sends
  traffic as a plan says (cluster: status, rendered into the canary Deployment and the
  routing ConfigMap by the reconcile; locally: one TorchServe per version and
  routing.json);
- a `MetricsSource` gives the analysis of a canary against stable (Prometheus in both).

Each tick: prepare the canary's server if the rollout will need it, decide with the
state machine (`state_machine.tick`), hand the transition to the caller to record,
then, if the rollout state changed, route traffic by the new plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.api.status import RolloutOutcome
from recsys_operator.render.naming import system_id
from recsys_operator.render.traffic import TrafficPlan, plan_for
from recsys_operator.rollout.prometheus_source import PrometheusSource
from recsys_operator.rollout.state_machine import (
    AnalysisSource,
    Gates,
    RolloutState,
    Transition,
    tick,
)


class TrafficRouter(Protocol):
    async def prepare(self, system: RecommenderSystem, version: str) -> bool:
        """Make `version` ready to take traffic before the tick may give it some.
        False: it could not be made ready; this tick decides nothing."""
        ...

    async def set_routes(self, system: RecommenderSystem, plan: TrafficPlan) -> None:
        """Send traffic as `plan` says (called after the new state was recorded)."""
        ...


class MetricsSource(Protocol):
    def analysis_for(self, system: RecommenderSystem, stable_version: str) -> AnalysisSource:
        """The analysis of `system`'s canary against `stable_version`."""
        ...


@dataclass(frozen=True)
class PrometheusMetrics:
    """The gateway's metrics in one Prometheus server (the operator's and local mode's)."""

    url: str
    timeout_s: int = 5

    def analysis_for(self, system: RecommenderSystem, stable_version: str) -> AnalysisSource:
        return PrometheusSource(
            self.url,
            system_id(system),
            stable_version,
            system.spec.rollout,
            timeout_s=self.timeout_s,
        )


@dataclass(frozen=True)
class FixedAnalysis:
    """A metrics source that always answers with one analysis (tests of the Kubernetes
    side, where no gateway runs, plug their own in)."""

    source: AnalysisSource

    def analysis_for(self, system: RecommenderSystem, stable_version: str) -> AnalysisSource:
        return self.source


def version_to_prepare(desired_version: str, state: RolloutState) -> str | None:
    """The version whose server must be ready before this tick, if any: the rollout's
    canary, or the version a new rollout will start. Never a version that was rolled
    back: the state machine does not retry it."""
    if desired_version == state.stable_version:
        return None
    if state.canary is not None:
        return desired_version if state.canary.version == desired_version else None
    last = state.last_rollout
    retried = (
        last is not None
        and last.version == desired_version
        and last.outcome is not RolloutOutcome.PROMOTED
    )
    return None if retried else desired_version


def traffic_plan(system: RecommenderSystem, state: RolloutState) -> TrafficPlan:
    return plan_for(system, state.stable_version, state.canary)


def no_gates(system: RecommenderSystem) -> Gates | None:
    return None


@dataclass(frozen=True)
class RolloutDriver:
    router: TrafficRouter
    metrics: MetricsSource
    gates: Callable[[RecommenderSystem], Gates | None] = no_gates
    """The webhooks, replica counts and shadow analysis of `system`'s gates (none: a
    rollout without webhooks, scale-up check or shadow phase)."""

    async def step(
        self,
        system: RecommenderSystem,
        state: RolloutState,
        *,
        record: Callable[[Transition], None] | None = None,
        action: str | None = None,
        now: datetime | None = None,
    ) -> Transition | None:
        """One tick: `prepare`, then `decide`. None: the canary could not be prepared,
        nothing was decided."""
        if not await self.prepare(system, state):
            return None
        return await self.decide(system, state, record=record, action=action, now=now)

    async def prepare(self, system: RecommenderSystem, state: RolloutState) -> bool:
        """Make the version this tick may give traffic ready to take it."""
        version = version_to_prepare(system.spec.model.version, state)
        return version is None or await self.router.prepare(system, version)

    async def decide(
        self,
        system: RecommenderSystem,
        state: RolloutState,
        *,
        record: Callable[[Transition], None] | None = None,
        action: str | None = None,
        now: datetime | None = None,
    ) -> Transition:
        """Decide with the state machine, have the transition recorded, then route.

        `action`: what a person asked for (the annotation's or the file's text, as
        given: the state machine validates it and acknowledges it in the transition).

        `record` stores the transition before traffic moves (a router that moves traffic
        by the stored state, as the cluster's does, needs none: its caller stores the
        result)."""
        transition = await tick(
            system.spec.model.version,
            system.spec.rollout,
            state,
            now or datetime.now(UTC),
            self.metrics.analysis_for(system, state.stable_version),
            action,
            self.gates(system),
        )
        if record is not None:
            record(transition)
        if transition.state != state:
            await self.router.set_routes(system, traffic_plan(system, transition.state))
        return transition
