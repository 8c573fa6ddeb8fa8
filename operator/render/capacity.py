"""How many serving replicas each track gets while a rollout runs.

- The canary gets its weight's share of `spec.serving.replicas` (at least one pod).
- `spec.rollout.canaryReplicas: Surge` (the default) adds those pods on top of the
  stable's; `FromStable` takes them from the stable's budget instead, so a system on a
  fixed number of GPUs never asks for more: the stable's fixed replicas, or its
  autoscaler's maximum, shrink by the canary's (never below one pod).
- While the rollout is Promoting with `status.canary.stableReplicasTarget` set, the
  stable is brought up to the replicas it will carry once it takes all traffic: the
  fixed count back to full, the autoscaler's minimum raised to the target (an
  autoscaler may have shrunk it while the canary took a share). The usual bounds
  return after the promotion; the autoscaler's scale-down behaviour then takes the
  stable down gently if the traffic does not need it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from recsys_operator.api.effective_scaling import EffectiveScaling
from recsys_operator.api.recommender_system import CanaryReplicas
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.api.status import CanaryPhase
from recsys_operator.render.traffic import TrafficPlan


@dataclass(frozen=True)
class ServingCapacity:
    stable_replicas: int | None  # None: the autoscaler owns them
    canary_replicas: int
    scaling: EffectiveScaling | None  # with the stable's bounds for this moment of the rollout


def canary_replicas(system: RecommenderSystem, weight: int) -> int:
    return max(1, math.ceil(system.spec.serving.replicas * weight / 100))


def serving_capacity(
    system: RecommenderSystem, plan: TrafficPlan, scaling: EffectiveScaling | None
) -> ServingCapacity:
    canary = canary_replicas(system, plan.canary_weight)
    status = system.status.canary if system.status else None
    target = (
        status.stable_replicas_target
        if status is not None and status.phase is CanaryPhase.PROMOTING
        else None
    )
    taken = (
        canary
        if plan.canary_version
        and target is None
        and system.spec.rollout.canary_replicas is CanaryReplicas.FROM_STABLE
        else 0
    )
    if scaling is None:
        full = system.spec.serving.replicas
        stable = max(full, target) if target is not None else max(1, full - taken)
        return ServingCapacity(stable, canary, None)
    bounds = scaling.serving
    if target is not None:
        bounds = replace(
            bounds, min_replicas=max(bounds.min_replicas, min(target, bounds.max_replicas))
        )
    elif taken:
        top = max(1, bounds.max_replicas - taken)
        bounds = replace(bounds, max_replicas=top, min_replicas=min(bounds.min_replicas, top))
    return ServingCapacity(None, canary, replace(scaling, serving=bounds))
