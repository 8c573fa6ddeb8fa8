"""Combining a ScalingPolicy with a RecommenderSystem's own tightening.

The policy is the SREs' promise to the cluster; a system may narrow it, never
widen it. The result is what the autoscaling objects are rendered from.
"""

from __future__ import annotations

from dataclasses import dataclass

from recsys_contracts.field_issues import FieldIssue
from recsys_operator.api.errors import PolicyViolation
from recsys_operator.api.recommender_system import RecommenderSystemSpec
from recsys_operator.api.scaling_policy import ScaleRule, ScalingEngine, ScalingPolicySpec


@dataclass(frozen=True)
class WorkloadScaling:
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class EffectiveScaling:
    """Bounds and targets in force for one RecommenderSystem."""

    policy_name: str
    engine: ScalingEngine
    serving: WorkloadScaling
    stream_jobs: WorkloadScaling
    gateway: WorkloadScaling
    target_p99_latency_ms: float
    target_cpu_utilization: int
    target_gpu_utilization: int | None
    gateway_target_cpu_utilization: int
    backlog_per_replica: int
    stream_jobs_fallback_replicas: int  # keda: held while the backlog cannot be read
    scale_up: ScaleRule
    scale_down: ScaleRule
    min_available_percent: int


def resolve_scaling(
    system: RecommenderSystemSpec, policy: ScalingPolicySpec, policy_name: str
) -> EffectiveScaling:
    """The policy narrowed by `system.scaling`; raises PolicyViolation naming every field that exceeds it."""
    issues: list[FieldIssue] = []
    ov = system.scaling
    pol = policy.serving
    quoted = f'ScalingPolicy "{policy_name}"'

    def check(field: str, value: float | None, limit: float, *, upper: bool) -> None:
        if value is None:
            return
        if upper and value > limit:
            issues.append(
                FieldIssue(f"spec.scaling.{field}", f"{value:g} exceeds {quoted} {field} {limit:g}")
            )
        if not upper and value < limit:
            issues.append(
                FieldIssue(
                    f"spec.scaling.{field}", f"{value:g} is below {quoted} {field} {limit:g}"
                )
            )

    check("minReplicas", ov.min_replicas, pol.min_replicas, upper=False)
    check("maxReplicas", ov.max_replicas, pol.max_replicas, upper=True)
    check("targetP99LatencyMs", ov.target_p99_latency_ms, pol.target_p99_latency_ms, upper=True)
    check(
        "backlogPerReplica",
        ov.backlog_per_replica,
        policy.stream_jobs.backlog_per_replica,
        upper=True,
    )

    min_replicas = ov.min_replicas if ov.min_replicas is not None else pol.min_replicas
    max_replicas = ov.max_replicas if ov.max_replicas is not None else pol.max_replicas
    if ov.min_replicas is not None and ov.max_replicas is None and min_replicas > max_replicas:
        issues.append(
            FieldIssue(
                "spec.scaling.minReplicas",
                f"{min_replicas} exceeds {quoted} maxReplicas {max_replicas}",
            )
        )
    if ov.max_replicas is not None and ov.min_replicas is None and max_replicas < min_replicas:
        issues.append(
            FieldIssue(
                "spec.scaling.maxReplicas",
                f"{max_replicas} is below {quoted} minReplicas {min_replicas}",
            )
        )
    if not min_replicas <= system.serving.replicas <= max_replicas:
        issues.append(
            FieldIssue(
                "spec.serving.replicas",
                f"{system.serving.replicas} is outside the allowed range {min_replicas}..{max_replicas} "
                f"({quoted} and spec.scaling)",
            )
        )
    if issues:
        raise PolicyViolation(f"spec against {quoted}", issues)

    return EffectiveScaling(
        policy_name=policy_name,
        engine=policy.engine,
        serving=WorkloadScaling(min_replicas, max_replicas),
        stream_jobs=WorkloadScaling(
            policy.stream_jobs.min_replicas, policy.stream_jobs.max_replicas
        ),
        gateway=WorkloadScaling(policy.gateway.min_replicas, policy.gateway.max_replicas),
        target_p99_latency_ms=(
            ov.target_p99_latency_ms
            if ov.target_p99_latency_ms is not None
            else pol.target_p99_latency_ms
        ),
        target_cpu_utilization=pol.target_cpu_utilization,
        target_gpu_utilization=pol.target_gpu_utilization,
        gateway_target_cpu_utilization=policy.gateway.target_cpu_utilization,
        backlog_per_replica=(
            ov.backlog_per_replica
            if ov.backlog_per_replica is not None
            else policy.stream_jobs.backlog_per_replica
        ),
        stream_jobs_fallback_replicas=(
            policy.stream_jobs.fallback_replicas
            if policy.stream_jobs.fallback_replicas is not None
            else policy.stream_jobs.max_replicas
        ),
        scale_up=policy.scale_up,
        scale_down=policy.scale_down,
        min_available_percent=policy.min_available_percent,
    )
