"""Which model versions serve traffic, and in what shares.

Derived from status alone (the rollout's state lives there), so every render of
an unchanged resource yields the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass

from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.api.status import CanaryPhase, CanaryStatus


@dataclass(frozen=True)
class TrafficPlan:
    stable_version: str
    canary_version: str | None = None
    canary_weight: int = 0
    shadow_percent: int = 0  # share of stable answers mirrored to the canary (shadow phase)

    @property
    def versions(self) -> list[str]:
        return [self.stable_version] + ([self.canary_version] if self.canary_version else [])


def traffic_plan(system: RecommenderSystem) -> TrafficPlan:
    """Stable is what status says has been promoted (the spec's version before the first
    rollout); a canary exists only while status records a rollout in progress."""
    status = system.status
    stable = (status.stable_version if status else None) or system.spec.model.version
    return plan_for(system, stable, status.canary if status else None)


def plan_for(
    system: RecommenderSystem, stable_version: str, canary: CanaryStatus | None
) -> TrafficPlan:
    """The split of a rollout state: all on stable, or the canary at its weight (and, in a
    shadow phase, the share of stable answers mirrored to it)."""
    if canary is None or canary.version == stable_version:
        return TrafficPlan(stable_version)
    return TrafficPlan(
        stable_version, canary.version, canary.weight, shadow_percent(system, canary)
    )


def shadow_percent(system: RecommenderSystem, canary: CanaryStatus) -> int:
    shadow = system.spec.rollout.shadow
    return shadow.percent if shadow is not None and canary.phase is CanaryPhase.SHADOW else 0
