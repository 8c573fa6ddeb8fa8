"""The `ScalingPolicy` spec: bounds and targets that platform SREs own.

A RecommenderSystem references one policy by name; it may tighten the policy
(narrower replica range, stricter latency target) but never exceed it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from recsys_contracts.api_base import ApiModel, field_error
from recsys_operator.api import cel


class ScalingEngine(StrEnum):
    HPA = "hpa"
    KEDA = "keda"


class ScaleRule(ApiModel):
    """How fast replicas may change in one direction (maps onto HPA `behavior`)."""

    stabilization_window_seconds: int = Field(default=0, ge=0, le=3600)
    """Recommendations over this window are considered before changing replicas."""
    max_pods_per_period: int | None = Field(default=None, ge=1)
    """At most this many pods added or removed per period."""
    max_percent_per_period: int | None = Field(default=None, ge=1, le=1000)
    """At most this percentage of current pods added or removed per period."""
    period_seconds: int = Field(default=60, ge=1, le=1800)
    """Length of a period."""


ORDERED = cel.rule(
    "self.minReplicas <= self.maxReplicas", "minReplicas exceeds maxReplicas", ".minReplicas"
)


class ReplicaBounds(ApiModel):
    """Minimum and maximum replicas of one workload (checked by ScalingPolicySpec)."""

    model_config = ConfigDict(json_schema_extra=cel.rules(ORDERED))  # subclasses inherit it

    min_replicas: int = Field(default=1, ge=0, le=1000)
    """Fewest replicas (0 allowed only with the keda engine)."""
    max_replicas: int = Field(default=10, ge=1, le=1000)
    """Most replicas."""


class ServingScaling(ReplicaBounds):
    """Autoscaling of the TorchServe pods."""

    target_p99_latency_ms: float = Field(default=100.0, gt=0, le=60_000)
    """p99 latency the serving tier is scaled to hold (keda: a Prometheus trigger)."""
    target_cpu_utilization: int = Field(default=70, ge=1, le=100)
    """Average CPU utilisation target in percent."""
    target_gpu_utilization: int | None = Field(default=None, ge=1, le=100)
    """Average GPU utilisation target in percent (keda: DCGM metric in Prometheus); unset: not used."""


class StreamJobScaling(ReplicaBounds):
    """Autoscaling of the stream feature jobs."""

    model_config = ConfigDict(
        json_schema_extra=cel.rules(
            ORDERED,
            cel.rule(
                "!has(self.fallbackReplicas) || (self.minReplicas <= self.fallbackReplicas && "
                "self.fallbackReplicas <= self.maxReplicas)",
                "fallbackReplicas is outside minReplicas..maxReplicas",
                ".fallbackReplicas",
            ),
        )
    )

    backlog_per_replica: int = Field(default=1000, ge=1)
    """Pulsar subscription backlog one replica should carry (keda pulsar trigger)."""
    fallback_replicas: int | None = Field(default=None, ge=0, le=1000)
    """keda: replicas held while the backlog cannot be read (3 failed polls); unset: maxReplicas.
    KEDA falls back only on AverageValue triggers, so serving and gateway have none."""


class GatewayScaling(ReplicaBounds):
    """Autoscaling of the gateway."""

    min_replicas: int = Field(default=2, ge=0, le=1000)
    """Fewest replicas; two keep the gateway up through a node drain."""
    target_cpu_utilization: int = Field(default=70, ge=1, le=100)
    """Average CPU utilisation target in percent."""


class ScalingPolicySpec(ApiModel):
    """Autoscaling bounds and targets for every RecommenderSystem that references this policy."""

    model_config = ConfigDict(
        json_schema_extra=cel.rules(
            *(
                cel.rule(
                    f"self.engine != 'hpa' || !has(self.{name}) || self.{name}.minReplicas >= 1",
                    "minReplicas 0 (scale to zero) needs engine keda; the HPA needs at least 1",
                    f".{name}.minReplicas",
                )
                for name in ("serving", "streamJobs", "gateway")
            ),
            cel.rule(
                "self.engine != 'hpa' || !has(self.serving) || "
                "!has(self.serving.targetGpuUtilization)",
                "GPU utilisation targets need engine keda (the HPA has no GPU metric)",
                ".serving.targetGpuUtilization",
            ),
        )
    )

    engine: ScalingEngine = ScalingEngine.HPA
    """hpa (autoscaling/v2 HorizontalPodAutoscaler, CPU) or keda (ScaledObject: latency, GPU, Pulsar backlog)."""
    serving: ServingScaling = Field(default_factory=ServingScaling)
    """Serving tier bounds and targets."""
    stream_jobs: StreamJobScaling = Field(default_factory=StreamJobScaling)
    """Stream feature job bounds and backlog target."""
    gateway: GatewayScaling = Field(default_factory=GatewayScaling)
    """Gateway bounds and target."""
    scale_up: ScaleRule = Field(
        default_factory=lambda: ScaleRule(
            stabilization_window_seconds=0, max_percent_per_period=100, period_seconds=15
        )
    )
    """How fast to add replicas."""
    scale_down: ScaleRule = Field(
        default_factory=lambda: ScaleRule(
            stabilization_window_seconds=300, max_percent_per_period=50, period_seconds=60
        )
    )
    """How fast to remove replicas."""
    min_available_percent: int = Field(default=50, ge=0, le=100)
    """PodDisruptionBudget: share of replicas kept through voluntary disruptions."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        """Every cross-field problem at once (one validator per check would stop at the first)."""
        problems: list[PydanticCustomError] = []
        hpa = self.engine is ScalingEngine.HPA
        for name, bounds in (
            ("serving", self.serving),
            ("streamJobs", self.stream_jobs),
            ("gateway", self.gateway),
        ):
            if bounds.min_replicas > bounds.max_replicas:
                problems.append(
                    field_error(
                        f"{name}.minReplicas",
                        f"minReplicas {bounds.min_replicas} exceeds maxReplicas {bounds.max_replicas}",
                    )
                )
            if hpa and bounds.min_replicas == 0:
                problems.append(
                    field_error(
                        f"{name}.minReplicas",
                        "minReplicas 0 (scale to zero) needs engine keda; the HPA needs at least 1",
                    )
                )
        fallback, jobs = self.stream_jobs.fallback_replicas, self.stream_jobs
        if fallback is not None and not jobs.min_replicas <= fallback <= jobs.max_replicas:
            problems.append(
                field_error(
                    "streamJobs.fallbackReplicas",
                    f"fallbackReplicas {fallback} is outside minReplicas..maxReplicas "
                    f"({jobs.min_replicas}..{jobs.max_replicas})",
                )
            )
        if hpa and self.serving.target_gpu_utilization is not None:
            problems.append(
                field_error(
                    "serving.targetGpuUtilization",
                    "GPU utilisation targets need engine keda (the HPA has no GPU metric)",
                )
            )
        if problems:
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [InitErrorDetails(type=problem, loc=(), input=None) for problem in problems],
            )
        return self
