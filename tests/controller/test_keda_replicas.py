"""KEDA ScaledObjects size Deployments as the policy means: checked with the HPA's formula.

KEDA turns each trigger into an External metric of the HPA, with the trigger's
`metricType` (default `AverageValue`) as the target type. The HPA then computes
(kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale, "Algorithm details"):

- `Value`:        desired = ceil(current * value / target)
- `AverageValue`: desired = ceil(current * (value / current) / target) = ceil(value / target)

within a 10% tolerance, clamped to min/max replicas; with several triggers the largest
proposal wins. These tests apply that formula to the rendered triggers.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from recsys_operator.api.resources import RecommenderSystem, ScalingPolicy
from recsys_operator.render import render_system

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 0.1  # the HPA's default --horizontal-pod-autoscaler-tolerance


def documents(name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((ROOT / "examples" / name).read_text()))


def keda_policy(**stream_jobs: Any) -> ScalingPolicy:
    doc = copy.deepcopy(documents("scaling-policy.yaml")[1])  # gpu-serving, engine keda
    doc["spec"]["streamJobs"].update(stream_jobs)
    return ScalingPolicy.model_validate(doc)


def production() -> RecommenderSystem:
    return RecommenderSystem.model_validate(documents("production-gpu.yaml")[0])


def scaled_object(workload: str, policy: ScalingPolicy | None = None) -> dict[str, Any]:
    policy = policy or keda_policy()
    system = production()
    system.spec.scaling_policy_ref.name = policy.metadata.name  # type: ignore[union-attr]
    objects = render_system(system, policy)
    name = f"{system.metadata.name}-{workload}"
    return next(o for o in objects if o["kind"] == "ScaledObject" and o["metadata"]["name"] == name)


def threshold(trigger: dict[str, Any]) -> float:
    meta = trigger["metadata"]
    return float(meta.get("threshold") or meta.get("msgBacklogThreshold") or meta["value"])


def hpa_desired(scaled: dict[str, Any], current: int, values: dict[str, float]) -> int:
    """The replicas the HPA asks for, given each named trigger's current value."""
    proposals = []
    for trigger in scaled["spec"]["triggers"]:
        key = trigger.get("name") or trigger["type"]
        if key not in values:
            continue
        value, target = values[key], threshold(trigger)
        if trigger.get("metricType", "AverageValue") == "Value":
            ratio = value / target
            proposal = current if abs(ratio - 1) <= TOLERANCE else math.ceil(current * ratio)
        else:
            proposal = math.ceil(value / target)
        proposals.append(proposal)
    lo, hi = scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]
    return min(hi, max(lo, max(proposals)))


def test_doubled_latency_doubles_the_serving_replicas() -> None:
    serving = scaled_object("serving")
    target = threshold(
        next(t for t in serving["spec"]["triggers"] if t.get("name") == "p99-latency")
    )
    # 6 pods at twice the p99 target: 12 pods, not value/target = 2 (AverageValue's answer).
    assert hpa_desired(serving, 6, {"p99-latency": 2 * target}) == 12
    # Half the target latency at 8 pods: 4 pods; at the target: unchanged.
    assert hpa_desired(serving, 8, {"p99-latency": target / 2}) == 4
    assert hpa_desired(serving, 8, {"p99-latency": target}) == 8


def test_gpu_utilisation_above_target_adds_pods_in_proportion() -> None:
    serving = scaled_object("serving")
    # The policy targets 75% GPU; 3 pods at 100%: ceil(3 * 100/75) = 4 pods.
    assert hpa_desired(serving, 3, {"gpu-utilization": 100}) == 4
    assert hpa_desired(serving, 10, {"gpu-utilization": 30}) == 4


def test_backlog_is_shared_between_stream_job_replicas() -> None:
    features = scaled_object("features")
    # backlogPerReplica 10000: 55,000 messages need 6 replicas whatever runs now.
    assert hpa_desired(features, 2, {"pulsar": 55_000}) == 6
    assert hpa_desired(features, 9, {"pulsar": 55_000}) == 6
    assert hpa_desired(features, 4, {"pulsar": 10**7}) == 16  # maxReplicas


def test_fallback_replicas_come_from_the_policy_on_the_backlog_trigger_only() -> None:
    features = scaled_object("features", keda_policy(fallbackReplicas=5))
    assert features["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 5}
    default = scaled_object("features")
    assert default["spec"]["fallback"]["replicas"] == 16  # unset: maxReplicas
    # KEDA falls back only on AverageValue triggers: serving's are Value, gateway's CPU.
    assert "fallback" not in scaled_object("serving")["spec"]
    assert "fallback" not in scaled_object("gateway")["spec"]


def test_fallback_replicas_outside_the_bounds_are_refused() -> None:
    with pytest.raises(ValidationError, match="fallbackReplicas 40 is outside"):
        keda_policy(fallbackReplicas=40)
