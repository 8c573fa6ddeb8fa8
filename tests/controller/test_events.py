"""Events say what changed, once: not one per child, not one per resync.

Kopf runs with resyncs every 2 s (tests/controller/conftest.py), so a few seconds cover
several resyncs of every system.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubemock.fixtures import KubeHandle, PulsarAdminHandle, wait_for
from prometheus_client import REGISTRY

from recsys_contracts.metric_names import OPERATOR_RECONCILES
from recsys_operator.controller import handlers

ROOT = Path(__file__).resolve().parents[2]
NS = "/apis/recsys.dev/v1alpha1/namespaces/default"
HANDLERS = "recsys_operator.controller.handlers"
pytestmark = pytest.mark.xdist_group("operator")


def system(pulsar: PulsarAdminHandle, name: str, policy: str) -> dict[str, Any]:
    doc = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text()))
    doc["metadata"]["name"] = name
    doc["spec"]["events"]["adminUrl"] = pulsar.url
    doc["spec"]["scalingPolicyRef"] = {"name": policy}
    return doc


def events_about(kube: KubeHandle, name: str) -> list[dict[str, Any]]:
    items = kube.get("/api/v1/namespaces/default/events")["items"]
    return [e for e in items if e["involvedObject"]["name"] == name]


def resyncs() -> float:
    sample = REGISTRY.get_sample_value(OPERATOR_RECONCILES, {"trigger": "resync"})
    return sample or 0.0


def test_creation_posts_one_event_and_a_blocked_system_warns_once(
    kube: KubeHandle, pulsar_admin: PulsarAdminHandle, run_operator: Callable[..., Any]
) -> None:
    handlers.STATE.analysis_source = None
    policy = next(yaml.safe_load_all((ROOT / "examples" / "scaling-policy.yaml").read_text()))
    kube.post(f"{NS}/scalingpolicies", policy)
    kube.post(f"{NS}/recommendersystems", system(pulsar_admin, "shop", "default"))
    kube.post(f"{NS}/recommendersystems", system(pulsar_admin, "stuck", "missing"))
    run_operator(HANDLERS)

    def applied() -> list[dict[str, Any]]:
        return [e for e in events_about(kube, "shop") if e["reason"] == "Applied"]

    wait_for(applied, timeout=30)
    wait_for(lambda: events_about(kube, "stuck"), timeout=30)
    start = resyncs()
    wait_for(lambda: resyncs() >= start + 4, timeout=30)  # both systems resynced twice

    shop = events_about(kube, "shop")
    assert len(applied()) == 1, [e["message"] for e in shop]
    assert "Deployment/shop-serving created" in applied()[0]["message"]
    assert not [e for e in shop if "Handler" in e.get("message", "")]  # Kopf's own, quiet
    stuck = events_about(kube, "stuck")
    assert [(e["type"], e["reason"]) for e in stuck] == [("Warning", "ReconcileFailed")], stuck
    assert "ScalingPolicyNotFound" in stuck[0]["message"]
