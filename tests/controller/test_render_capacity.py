"""Serving replicas and routing while a rollout runs: a canary on the stable's budget (FromStable),
the stable brought up to full strength before it takes all traffic, and a shadow phase's
mirroring."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from recsys_operator.api.resources import RecommenderSystem, ScalingPolicy
from recsys_operator.render import render_system

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.35.0"


def load(name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((ROOT / "examples" / name).read_text()))


KEDA_POLICY = ScalingPolicy.model_validate(load("scaling-policy.yaml")[1])
STABLE = {"stableVersion": "1", "stableArchiveUri": "s3://ml-models/home-feed/old.mar"}


def production(
    canary: dict[str, Any] | None, *, policy: bool = True, **rollout: Any
) -> RecommenderSystem:
    doc = copy.deepcopy(load("production-gpu.yaml")[0])
    doc["spec"]["model"]["version"] = "2"
    doc["spec"]["rollout"].update(rollout)
    if not policy:
        del doc["spec"]["scalingPolicyRef"], doc["spec"]["scaling"]
    doc["status"] = {**STABLE, **({"canary": {"version": "2", **canary}} if canary else {})}
    return RecommenderSystem.model_validate(doc)


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def replicas(objects: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    stable = named(objects, "Deployment", "home-feed-serving")["spec"].get("replicas")
    canary = next(
        (
            o["spec"]["replicas"]
            for o in objects
            if o["kind"] == "Deployment" and o["metadata"]["name"] == "home-feed-serving-canary"
        ),
        None,
    )
    return stable, canary


def serving_bounds(objects: list[dict[str, Any]]) -> tuple[int, int]:
    spec = named(objects, "ScaledObject", "home-feed-serving")["spec"]
    return spec["minReplicaCount"], spec["maxReplicaCount"]


AT_50 = {"weight": 50, "step": 3, "phase": "Progressing"}


def test_a_surging_canary_comes_on_top_of_a_fixed_stable() -> None:
    objects = render_system(production(AT_50, policy=False))
    assert replicas(objects) == (4, 2)  # 50% of 4 on top of the 4


def test_from_stable_takes_the_canary_pods_out_of_a_fixed_stable() -> None:
    objects = render_system(production(AT_50, policy=False, canaryReplicas="FromStable"))
    assert replicas(objects) == (2, 2)  # the 4 GPUs shared, never 6
    # Never below one stable pod: with a single replica the canary still surges.
    doc = production(AT_50, policy=False, canaryReplicas="FromStable")
    doc.spec.serving.replicas = 1
    assert replicas(render_system(doc)) == (1, 1)


def test_from_stable_lowers_the_stable_autoscalers_ceiling_by_the_canary() -> None:
    surge = render_system(production(AT_50), KEDA_POLICY)
    shared = render_system(production(AT_50, canaryReplicas="FromStable"), KEDA_POLICY)
    assert serving_bounds(surge) == (4, 24)
    assert serving_bounds(shared) == (4, 22)  # 24 minus the canary's 2
    assert replicas(shared) == (None, 2)


def test_promoting_raises_the_stable_to_the_target_before_the_switch() -> None:
    promoting = {**AT_50, "phase": "Promoting", "stableReplicasTarget": 9}
    objects = render_system(production(promoting, canaryReplicas="FromStable"), KEDA_POLICY)
    assert serving_bounds(objects) == (9, 24)  # full ceiling back, floor at the target
    assert replicas(objects) == (None, 2)  # the canary keeps serving until the switch
    fixed = render_system(production(promoting, policy=False, canaryReplicas="FromStable"))
    assert replicas(fixed) == (9, 2)
    # A target beyond the ceiling is held to it.
    huge = {**promoting, "stableReplicasTarget": 99}
    assert serving_bounds(render_system(production(huge), KEDA_POLICY)) == (24, 24)


def test_after_the_promotion_the_usual_bounds_return() -> None:
    doc = production(None, canaryReplicas="FromStable")
    objects = render_system(doc, KEDA_POLICY)
    assert serving_bounds(objects) == (4, 24) and replicas(objects) == (None, None)


def test_rendered_capacity_objects_are_valid_kubernetes() -> None:
    fixed = render_system(
        production(
            {**AT_50, "phase": "Promoting", "stableReplicasTarget": 4},
            policy=False,
            canaryReplicas="FromStable",
        )
    )
    for obj in fixed:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_a_shadow_phase_mirrors_in_the_routing_and_routes_no_user() -> None:
    import json

    shadowing = {"weight": 0, "step": 0, "phase": "Shadow"}
    doc = production(shadowing, shadow={"duration": "10m", "percent": 30})
    objects = render_system(doc, KEDA_POLICY)
    routing = json.loads(named(objects, "ConfigMap", "home-feed-gateway")["data"]["routing.json"])
    assert (routing["canaryWeight"], routing["shadowPercent"]) == (0, 30)
    assert routing["canary"]["version"] == "2"
    assert replicas(objects) == (None, 1)  # the canary's one pod answers the mirrored requests
    # Past the shadow phase nothing is mirrored any more.
    progressing = render_system(production(AT_50, shadow={"percent": 30}), KEDA_POLICY)
    routing = json.loads(
        named(progressing, "ConfigMap", "home-feed-gateway")["data"]["routing.json"]
    )
    assert "shadowPercent" not in routing and routing["canaryWeight"] == 50
