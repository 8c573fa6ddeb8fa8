"""Driving rollouts in a cluster: the rollout driver (`rollout/driver.py`) with
Prometheus as its metrics source and the resource's status as its memory.

Traffic moves by writing status: the gateway's routing ConfigMap and the canary
Deployment are rendered from it by the next reconcile, which runs right after.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from recsys_contracts.field_issues import InvalidResource
from recsys_operator.api.desired_model import serving_system
from recsys_operator.api.reasons import BLOCKING_REASONS
from recsys_operator.api.recommender_system import CanaryReplicas
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.api.status import (
    ConditionStatus,
    ConditionType,
    RolloutActionResult,
)
from recsys_operator.controller.conditions import condition, merge_conditions
from recsys_operator.controller.kube import KubeClient
from recsys_operator.controller.reconcile import parse_system
from recsys_operator.render.naming import Track, serving_name, system_id
from recsys_operator.render.traffic import TrafficPlan
from recsys_operator.rollout.driver import (
    FixedAnalysis,
    MetricsSource,
    PrometheusMetrics,
    RolloutDriver,
)
from recsys_operator.rollout.shadow_analysis import PrometheusShadowSource
from recsys_operator.rollout.state_machine import (
    Action,
    AnalysisSource,
    Gates,
    ReplicaSource,
    RolloutState,
    ServingReplicas,
    ShadowSource,
    Transition,
)
from recsys_operator.rollout.webhooks import HttpWebhooks, WebhookCaller

ACTION_ANNOTATION = "recsys.dev/rollout-action"


class RenderedRouting:
    """The cluster's traffic router. The canary Deployment and the routing ConfigMap are
    children rendered from status, so both follow the status patch the Kopf timer writes
    and the reconcile it runs right after: nothing is left to do here."""

    async def prepare(self, system: RecommenderSystem, version: str) -> bool:
        return True  # the reconcile after the status write renders the canary Deployment

    async def set_routes(self, system: RecommenderSystem, plan: TrafficPlan) -> None:
        return None


def blocking_reason(body: dict[str, Any]) -> str | None:
    """Why the system's children cannot be applied right now, if they cannot: a rollout
    that moved on would change status while the routing (a child) stays where it was."""
    for cond in (body.get("status") or {}).get("conditions") or []:
        if (
            cond.get("type") == ConditionType.SERVING_READY
            and cond.get("status") == ConditionStatus.FALSE
            and cond.get("reason") in BLOCKING_REASONS
        ):
            return str(cond["reason"])
    return None


def rollout_state(system: RecommenderSystem) -> RolloutState:
    status = system.status
    stable = (status.stable_version if status else None) or system.spec.model.version
    last_action = status.last_action if status else None
    return RolloutState(
        stable_version=stable,
        canary=status.canary if status else None,
        last_rollout=status.last_rollout if status else None,
        # A pause lasts until the next action (resume, abort or promote) replaces it.
        paused=last_action is not None
        and last_action.action == Action.PAUSE
        and last_action.result is RolloutActionResult.APPLIED,
    )


def status_patch(
    system: RecommenderSystem, body: dict[str, Any], transition: Transition
) -> dict[str, Any]:
    """The status fields a transition changes (None removes a field in a merge patch)."""
    generation = int(body.get("metadata", {}).get("generation") or 0)
    state = transition.state
    health = transition.health
    old = body.get("status") or {}
    healthy = condition(
        ConditionType.ROLLOUT_HEALTHY, health.ok, health.reason, health.message, generation
    )
    patch: dict[str, Any] = {
        "stableVersion": state.stable_version,
        "canary": state.canary.to_wire() if state.canary else None,
        "lastRollout": state.last_rollout.to_wire() if state.last_rollout else None,
        "conditions": merge_conditions(old.get("conditions", []), [healthy]),
    }
    if transition.promoted:
        patch["stableArchiveUri"] = system.spec.model.archive_uri
    if transition.action is not None:
        patch["lastAction"] = transition.action.to_wire()
    return patch


def cluster_replicas(kube: KubeClient, system: RecommenderSystem) -> ReplicaSource:
    """Ready serving pods per track from the Deployments' status, and what the stable
    needs to carry all traffic: with an autoscaler, the pods serving now (stable plus
    canary) within the autoscaler's ceiling; without one, the full fixed count when
    the canary took its pods from the stable (else nothing: the stable never shrank)."""
    namespace = system.metadata.namespace or "default"
    stable_name = serving_name(system, Track.STABLE)

    def ready(track: str) -> int:
        deployment = kube.get("apps/v1", "Deployment", namespace, serving_name(system, track))
        return int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)

    def ceiling() -> int | None:
        for api_version, kind, field in (
            ("keda.sh/v1alpha1", "ScaledObject", "maxReplicaCount"),
            ("autoscaling/v2", "HorizontalPodAutoscaler", "maxReplicas"),
        ):
            try:
                scaler = kube.get(api_version, kind, namespace, stable_name)
            except Exception:  # a kind this cluster does not serve
                continue
            if scaler is not None and isinstance(scaler.get("spec", {}).get(field), int):
                return int(scaler["spec"][field])
        return None

    def count() -> ServingReplicas:
        stable, canary = ready(Track.STABLE), ready(Track.CANARY)
        spec = system.spec
        from_stable = spec.rollout.canary_replicas is CanaryReplicas.FROM_STABLE
        needed: int | None = None
        if spec.scaling_policy_ref is not None:
            needed = stable + canary
            top = ceiling()
            if top is not None:
                # FromStable lowered the ceiling by the canary's pods; promotion gives them back.
                needed = min(needed, top + (canary if from_stable else 0))
        elif from_stable:
            needed = spec.serving.replicas
        return ServingReplicas(stable, canary, needed)

    async def source() -> ServingReplicas | None:
        return await asyncio.to_thread(count)

    return source


def changed(old_status: dict[str, Any], patch: dict[str, Any]) -> bool:
    return any(old_status.get(k) != v for k, v in patch.items())


async def rollout_tick(
    body: dict[str, Any],
    prometheus_url: str,
    now: datetime | None = None,
    source: AnalysisSource | None = None,
    webhooks: WebhookCaller | None = None,
    replicas: ReplicaSource | None = None,
    shadow: ShadowSource | None = None,
) -> tuple[dict[str, Any] | None, Transition | None]:
    """(status patch or None when nothing changed, the transition) for one system."""
    if blocking_reason(body):
        return None, None  # the rollout waits until the reconcile can move traffic again
    try:
        system = serving_system(parse_system(body))
    except InvalidResource:
        return None, None  # the reconcile reports invalid specs
    state = rollout_state(system)
    action = (body.get("metadata", {}).get("annotations") or {}).get(ACTION_ANNOTATION)
    metrics: MetricsSource = (
        FixedAnalysis(source) if source is not None else PrometheusMetrics(prometheus_url)
    )
    shadow_spec = system.spec.rollout.shadow
    if shadow is None and shadow_spec is not None:
        shadow = PrometheusShadowSource(prometheus_url, system_id(system), shadow_spec)
    gates = Gates(
        webhooks or HttpWebhooks(system.metadata.name, system.metadata.namespace or "default"),
        replicas,
        shadow,
    )
    transition = await RolloutDriver(RenderedRouting(), metrics, gates=lambda _: gates).step(
        system, state, action=action, now=now
    )
    assert transition is not None  # RenderedRouting is always prepared
    patch = status_patch(system, body, transition)
    return (patch if changed(body.get("status") or {}, patch) else None), transition
