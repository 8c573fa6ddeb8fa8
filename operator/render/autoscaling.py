"""Autoscaling objects derived from the effective ScalingPolicy, and PodDisruptionBudgets.

engine `hpa`: autoscaling/v2 HorizontalPodAutoscalers on CPU for serving, gateway
and stream jobs (the HPA has no latency, GPU or backlog metric of its own).
engine `keda`: KEDA ScaledObjects: serving on p99 latency from Prometheus (and
GPU utilisation when targeted) plus CPU, stream jobs on Pulsar backlog, gateway
on CPU. Both carry the policy's scale-up/scale-down behaviour.

KEDA hands each trigger to the HPA as an External metric whose target type is the
trigger's `metricType`. `AverageValue` (KEDA's default) divides the value by the
replica count, right for a backlog that replicas share (desired = backlog /
per-replica target); a p99 latency or a GPU utilisation is already per pod, so those
triggers are `Value` (desired = current x value / target), else the Deployment is
sized to value/target whatever the load per pod. KEDA's `fallback` applies only to
AverageValue triggers: the stream jobs get it (the policy's fallbackReplicas).
"""

from __future__ import annotations

from typing import Any

from recsys_contracts.metric_names import GATEWAY_LATENCY
from recsys_operator.api.effective_scaling import EffectiveScaling, WorkloadScaling
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.api.scaling_policy import ScaleRule, ScalingEngine
from recsys_operator.render.naming import (
    FEATURES_SUBSCRIPTION,
    TOPIC_NAMES,
    Component,
    Track,
    child_name,
    metadata,
    selector_labels,
    serving_name,
    system_id,
    topic_url,
)

# Where KEDA's Prometheus trigger finds the gateway's latency histogram; platform
# teams override it with the operator's --prometheus-url.
DEFAULT_PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc:9090"


def _scale_rule(rule: ScaleRule) -> dict[str, Any]:
    policies = []
    if rule.max_pods_per_period is not None:
        policies.append(
            {
                "type": "Pods",
                "value": rule.max_pods_per_period,
                "periodSeconds": rule.period_seconds,
            }
        )
    if rule.max_percent_per_period is not None:
        policies.append(
            {
                "type": "Percent",
                "value": rule.max_percent_per_period,
                "periodSeconds": rule.period_seconds,
            }
        )
    out: dict[str, Any] = {"stabilizationWindowSeconds": rule.stabilization_window_seconds}
    if policies:
        out["policies"] = policies
        out["selectPolicy"] = "Max"
    return out


def _behavior(scaling: EffectiveScaling) -> dict[str, Any]:
    return {"scaleUp": _scale_rule(scaling.scale_up), "scaleDown": _scale_rule(scaling.scale_down)}


def _cpu_metric(target: int) -> dict[str, Any]:
    return {
        "type": "Resource",
        "resource": {
            "name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": target},
        },
    }


def _hpa(
    system: RecommenderSystem,
    name: str,
    component: str,
    bounds: WorkloadScaling,
    cpu: int,
    scaling: EffectiveScaling,
) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(system, name, component),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": max(1, bounds.min_replicas),
            "maxReplicas": bounds.max_replicas,
            "metrics": [_cpu_metric(cpu)],
            "behavior": _behavior(scaling),
        },
    }


FALLBACK_FAILURE_THRESHOLD = 3  # failed polls of a trigger before KEDA falls back


def _scaled_object(
    system: RecommenderSystem,
    name: str,
    component: str,
    bounds: WorkloadScaling,
    triggers: list[dict[str, Any]],
    scaling: EffectiveScaling,
    fallback_replicas: int | None = None,
) -> dict[str, Any]:
    scaled: dict[str, Any] = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": metadata(system, name, component),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicaCount": bounds.min_replicas,
            "maxReplicaCount": bounds.max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": max(60, scaling.scale_down.stabilization_window_seconds),
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(scaling)}},
            "triggers": triggers,
        },
    }
    if fallback_replicas is not None:
        scaled["spec"]["fallback"] = {
            "failureThreshold": FALLBACK_FAILURE_THRESHOLD,
            "replicas": fallback_replicas,
        }
    return scaled


def _keda_cpu_trigger(target: int) -> dict[str, Any]:
    return {"type": "cpu", "metricType": "Utilization", "metadata": {"value": str(target)}}


def serving_latency_query(system: RecommenderSystem, variant: str = Track.STABLE) -> str:
    """p99 gateway latency (ms) of one variant over the last 2 minutes."""
    selector = f'system="{system_id(system)}",variant="{variant}"'
    return f"histogram_quantile(0.99, sum by (le) (rate({GATEWAY_LATENCY}_bucket{{{selector}}}[2m]))) * 1000"


def pulsar_trigger_auth_name(system: RecommenderSystem) -> str:
    return child_name(system, "pulsar-auth")


def build_pulsar_trigger_authentication(system: RecommenderSystem) -> dict[str, Any] | None:
    """KEDA TriggerAuthentication carrying the Pulsar token, when the cluster needs one."""
    ref = system.spec.events.auth_secret_ref
    if ref is None:
        return None
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": metadata(system, pulsar_trigger_auth_name(system), Component.FEATURES),
        "spec": {
            "secretTargetRef": [{"parameter": "bearerToken", "name": ref.name, "key": ref.key}]
        },
    }


def build_autoscalers(
    system: RecommenderSystem,
    scaling: EffectiveScaling,
    prometheus_url: str = DEFAULT_PROMETHEUS_URL,
) -> list[dict[str, Any]]:
    """One autoscaler per workload (stable serving, gateway, stream jobs)."""
    serving = serving_name(system, Track.STABLE)
    gateway = child_name(system, "gateway")
    features = child_name(system, "features")
    if scaling.engine is ScalingEngine.HPA:
        return [
            _hpa(
                system,
                serving,
                Component.SERVING,
                scaling.serving,
                scaling.target_cpu_utilization,
                scaling,
            ),
            _hpa(
                system,
                gateway,
                Component.GATEWAY,
                scaling.gateway,
                scaling.gateway_target_cpu_utilization,
                scaling,
            ),
            _hpa(system, features, Component.FEATURES, scaling.stream_jobs, 70, scaling),
        ]

    serving_triggers = [
        {
            "type": "prometheus",
            "name": "p99-latency",
            "metricType": "Value",  # a per-pod figure: not divided by the replica count
            "metadata": {
                "serverAddress": prometheus_url,
                "query": serving_latency_query(system),
                "threshold": f"{scaling.target_p99_latency_ms:g}",
            },
        },
        _keda_cpu_trigger(scaling.target_cpu_utilization),
    ]
    if scaling.target_gpu_utilization is not None:
        namespace = system.metadata.namespace or "default"
        serving_triggers.append(
            {
                "type": "prometheus",
                "name": "gpu-utilization",
                "metricType": "Value",  # already an average over the pods
                "metadata": {
                    "serverAddress": prometheus_url,
                    # DCGM exporter metric, averaged over the stable Deployment's pods
                    # (<deployment>-<replicaset hash>-<pod suffix>; not the canary's).
                    "query": f'avg(DCGM_FI_DEV_GPU_UTIL{{namespace="{namespace}",pod=~"{serving}-[a-z0-9]+-[a-z0-9]+"}})',
                    "threshold": str(scaling.target_gpu_utilization),
                },
            }
        )
    pulsar_trigger: dict[str, Any] = {
        "type": "pulsar",
        "metricType": "AverageValue",  # the backlog is shared: per-replica share vs target
        "metadata": {
            "adminURL": system.spec.events.admin_url,
            "topic": topic_url(system, TOPIC_NAMES["interactions"]),
            "subscription": FEATURES_SUBSCRIPTION,
            "isPartitionedTopic": "true",
            "msgBacklogThreshold": str(scaling.backlog_per_replica),
        },
    }
    if system.spec.events.auth_secret_ref is not None:
        pulsar_trigger["metadata"]["authModes"] = "bearer"
        pulsar_trigger["authenticationRef"] = {"name": pulsar_trigger_auth_name(system)}
    return [
        _scaled_object(
            system, serving, Component.SERVING, scaling.serving, serving_triggers, scaling
        ),
        _scaled_object(
            system,
            gateway,
            Component.GATEWAY,
            scaling.gateway,
            [_keda_cpu_trigger(scaling.gateway_target_cpu_utilization)],
            scaling,
        ),
        _scaled_object(
            system,
            features,
            Component.FEATURES,
            scaling.stream_jobs,
            [pulsar_trigger],
            scaling,
            fallback_replicas=scaling.stream_jobs_fallback_replicas,
        ),
    ]


def build_disruption_budgets(
    system: RecommenderSystem, min_available_percent: int
) -> list[dict[str, Any]]:
    """PDBs keeping a share of serving, gateway and stream-job pods through node drains."""
    budgets = []
    for name, component, track in (
        (serving_name(system, Track.STABLE), Component.SERVING, Track.STABLE),
        (child_name(system, "gateway"), Component.GATEWAY, None),
        (child_name(system, "features"), Component.FEATURES, None),
    ):
        budgets.append(
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": metadata(system, name, component),
                "spec": {
                    "minAvailable": f"{min_available_percent}%",
                    "selector": {"matchLabels": selector_labels(system, component, track)},
                },
            }
        )
    return budgets
