"""Children that the desired state no longer contains are deleted, and fields it dropped removed.

One reconcile at a time (the Reconciler, no Kopf) against the Kubernetes API emulator
with KEDA and the Prometheus operator's CRDs installed, and Pulsar's admin emulator.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
from kubemock.emulator import KubeEmulator
from kubemock.fixtures import KEDA_CRDS, PROMETHEUS_OPERATOR_CRDS, KubeHandle, PulsarAdminHandle

from recsys_operator.api.resources import ScalingPolicy
from recsys_operator.controller.kube import LAST_APPLIED, KubeClient
from recsys_operator.controller.reconcile import Reconciler, parse_system
from recsys_operator.render import CHILD_KINDS, RenderOptions, render_system

ROOT = Path(__file__).resolve().parents[2]
NS = "/apis/recsys.dev/v1alpha1/namespaces/default"
AUTOSCALERS = {
    "HorizontalPodAutoscaler": "/apis/autoscaling/v2/namespaces/default/horizontalpodautoscalers",
    "ScaledObject": "/apis/keda.sh/v1alpha1/namespaces/default/scaledobjects",
}


class World:
    def __init__(self, kube: KubeHandle, pulsar: PulsarAdminHandle):
        self.kube = kube
        kube.install_crds(*KEDA_CRDS, *PROMETHEUS_OPERATOR_CRDS)
        self.client = KubeClient(kube.api_client)
        policy = next(yaml.safe_load_all((ROOT / "examples" / "scaling-policy.yaml").read_text()))
        kube.post(f"{NS}/scalingpolicies", policy)
        system = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
        system["spec"]["events"]["adminUrl"] = pulsar.url
        kube.post(f"{NS}/recommendersystems", system)

    def reconcile(self, *, monitoring: bool = True) -> Any:
        body = self.kube.get(f"{NS}/recommendersystems/quickstart")
        reconciler = Reconciler(self.client, RenderOptions(monitoring=monitoring))
        return asyncio.run(reconciler.reconcile(body))

    def patch(self, kind: str, name: str, patch: dict[str, Any]) -> None:
        self.client.merge_patch("recsys.dev/v1alpha1", kind, "default", name, patch)

    def set_training(self, training: dict[str, Any]) -> None:
        """spec.training, with version 1's archive in the model store (where a run reads
        the stable version from)."""
        model = {"archiveUri": "pvc://models/retrieval/retrieval-1.mar"}
        self.patch(
            "RecommenderSystem", "quickstart", {"spec": {"model": model, "training": training}}
        )

    def names(self, api_version: str, kind: str) -> list[str]:
        objects = self.client.list_objects(api_version, kind, "default")
        return sorted(obj["metadata"]["name"] for obj in objects)

    def autoscalers_per_deployment(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {name: [] for name in self.names("apps/v1", "Deployment")}
        for kind, path in AUTOSCALERS.items():
            for obj in self.kube.get(path)["items"]:
                found[obj["spec"]["scaleTargetRef"]["name"]].append(kind)
        return found


@pytest.fixture
def world(kube: KubeHandle, pulsar_admin: PulsarAdminHandle) -> World:
    return World(kube, pulsar_admin)


@pytest.mark.parametrize("first,second", [("hpa", "keda"), ("keda", "hpa")])
def test_an_engine_switch_leaves_one_autoscaler_per_workload(
    world: World, first: str, second: str
) -> None:
    for engine in (first, second):
        world.patch("ScalingPolicy", "default", {"spec": {"engine": engine}})
        outcome = world.reconcile()
        assert not outcome.warnings, outcome.warnings
        kind = "ScaledObject" if engine == "keda" else "HorizontalPodAutoscaler"
        per_deployment = world.autoscalers_per_deployment()
        assert per_deployment and all(kinds == [kind] for kinds in per_deployment.values()), (
            per_deployment
        )
    gone = "HorizontalPodAutoscaler" if second == "keda" else "ScaledObject"
    assert any(change.startswith(gone) and "deleted" in change for change in outcome.changes)
    if second == "hpa":  # KEDA's TriggerAuthentication goes with the ScaledObjects
        assert world.names("keda.sh/v1alpha1", "TriggerAuthentication") == []


def test_removing_the_policy_removes_autoscalers_and_disruption_budgets(world: World) -> None:
    world.reconcile()
    assert world.names("policy/v1", "PodDisruptionBudget")
    world.patch("RecommenderSystem", "quickstart", {"spec": {"scalingPolicyRef": None}})
    world.reconcile()
    assert world.autoscalers_per_deployment() == {
        name: [] for name in world.names("apps/v1", "Deployment")
    }
    assert world.names("policy/v1", "PodDisruptionBudget") == []
    # The operator sets the replicas again now that no autoscaler does.
    serving = world.client.get("apps/v1", "Deployment", "default", "quickstart-serving")
    assert serving is not None and serving["spec"]["replicas"] == 1


def test_monitoring_turned_off_removes_its_objects(world: World) -> None:
    world.reconcile(monitoring=True)
    assert world.names("monitoring.coreos.com/v1", "ServiceMonitor")
    assert world.names("monitoring.coreos.com/v1", "PrometheusRule")
    services = world.names("v1", "Service")
    world.reconcile(monitoring=False)
    assert world.names("monitoring.coreos.com/v1", "ServiceMonitor") == []
    assert world.names("monitoring.coreos.com/v1", "PrometheusRule") == []
    assert len(world.names("v1", "Service")) == len(services) - 1  # the metrics Service


def test_objects_not_owned_by_the_system_are_never_deleted(world: World) -> None:
    world.reconcile()
    # Same labels, but someone else's object (no ownerReference to this system).
    stray = {
        "metadata": {
            "name": "quickstart-extra",
            "labels": {
                "app.kubernetes.io/instance": "quickstart",
                "app.kubernetes.io/managed-by": "recsys-operator",
            },
        },
        "data": {"k": "v"},
    }
    world.kube.post("/api/v1/namespaces/default/configmaps", stray)
    outcome = world.reconcile()
    assert "quickstart-extra" in world.names("v1", "ConfigMap"), outcome.changes
    assert not [c for c in outcome.changes if "deleted" in c]


def test_a_field_the_desired_object_dropped_is_removed(world: World) -> None:
    world.reconcile()
    client = world.client
    live = client.get("apps/v1", "Deployment", "default", "quickstart-features")
    assert live is not None
    desired = copy.deepcopy(live)
    desired["metadata"] = {
        k: v for k, v in live["metadata"].items() if k in ("name", "namespace", "labels")
    }
    desired["spec"]["template"]["metadata"].setdefault("annotations", {})["example/x"] = "1"
    desired.pop("status", None)
    client.apply(desired)
    patched = client.get("apps/v1", "Deployment", "default", "quickstart-features")
    assert patched is not None
    assert patched["spec"]["template"]["metadata"]["annotations"]["example/x"] == "1"

    del desired["spec"]["template"]["metadata"]["annotations"]["example/x"]
    assert client.apply(desired).action == "patched"
    after = client.get("apps/v1", "Deployment", "default", "quickstart-features")
    assert after is not None
    assert "example/x" not in after["spec"]["template"]["metadata"].get("annotations", {})
    assert client.apply(desired).action == "unchanged"  # and then nothing more to do
    assert LAST_APPLIED in after["metadata"]["annotations"]


def test_a_steady_system_is_pruned_and_patched_no_more(world: World) -> None:
    world.reconcile()
    mark = world.kube.emulator.mark()
    outcome = world.reconcile()
    writes = world.kube.emulator.writes_since(mark, exclude=("events", "recommendersystems"))
    assert not writes and not outcome.changes, outcome.changes


def test_child_kinds_list_every_kind_rendered(world: World) -> None:
    body = world.kube.get(f"{NS}/recommendersystems/quickstart")
    body["spec"]["events"]["authSecretRef"] = {"name": "pulsar", "key": "token"}  # KEDA's auth
    body["spec"]["model"]["archiveUri"] = "pvc://models/retrieval/retrieval-1.mar"
    body["spec"]["training"] = {"logUri": "s3://log/q", "modelStoreUri": "pvc://models/retrieval"}
    system = parse_system(body)
    rendered: set[tuple[str, str]] = set()
    for engine in ("hpa", "keda"):
        world.patch("ScalingPolicy", "default", {"spec": {"engine": engine}})
        policy_body = world.kube.get(f"{NS}/scalingpolicies/default")
        policy = ScalingPolicy.model_validate(
            {"metadata": {"name": "default"}, "spec": policy_body["spec"]}
        )
        objects = render_system(system, policy, RenderOptions(monitoring=True))
        rendered |= {(obj["apiVersion"], obj["kind"]) for obj in objects}
    body["spec"]["training"] |= {"engine": "RayJob", "ray": {"image": "ray-trainer:2.52.0"}}
    objects = render_system(parse_system(body), policy, RenderOptions(ray=True))
    rendered |= {(obj["apiVersion"], obj["kind"]) for obj in objects}
    assert rendered == set(CHILD_KINDS)


def test_an_invalid_policy_blocks_with_every_problem_named_once(world: World) -> None:
    bad = {
        "spec": {
            "engine": "hpa",
            "streamJobs": {"minReplicas": 0},
            "serving": {"targetGpuUtilization": 50},
            "gateway": {"minReplicas": 9, "maxReplicas": 3},
        }
    }
    world.patch("ScalingPolicy", "default", bad)
    outcome = world.reconcile()
    ready = next(c for c in outcome.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ScalingPolicyInvalid"
    for path in ("spec.streamJobs.minReplicas", "spec.gateway.minReplicas"):
        assert path in ready["message"], ready["message"]
    assert "spec.serving.targetGpuUtilization" in ready["message"]
    assert "spec.spec." not in ready["message"]


def keda_admission(monkeypatch: pytest.MonkeyPatch) -> None:
    """KEDA's admission webhook: a ScaledObject is refused while another HPA scales its
    workload ("the workload ... is already managed by the hpa ...")."""
    create = KubeEmulator._create

    def refusing(self: KubeEmulator, request: Any, body: Any) -> Any:
        if request.resource is not None and request.resource.plural == "scaledobjects":
            target = ((body.get("spec") or {}).get("scaleTargetRef") or {}).get("name")
            for (resource, _, name), obj in self.objects.items():
                if resource.plural != "horizontalpodautoscalers" or obj.deleted:
                    continue
                if ((obj.raw.get("spec") or {}).get("scaleTargetRef") or {}).get("name") == target:
                    message = (
                        'admission webhook "vscaledobject.kb.io" denied the request: the '
                        f"workload '{target}' of type 'apps/v1.Deployment' is already managed "
                        f"by the hpa '{name}'"
                    )
                    raise kmock.KubernetesError(
                        status=400,
                        reason="BadRequest",
                        message=message,
                        details={"causes": [{"message": message}]},
                    )
        return create(self, request, body)

    monkeypatch.setattr(KubeEmulator, "_create", refusing)


def test_a_switch_to_keda_passes_its_admission_webhook_in_one_reconcile(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HPAs go before their ScaledObjects come: KEDA refuses a ScaledObject for a
    workload another HPA scales, so applying first would fail the switch."""
    world.reconcile()
    assert all(
        k == ["HorizontalPodAutoscaler"] for k in world.autoscalers_per_deployment().values()
    )
    keda_admission(monkeypatch)
    world.patch("ScalingPolicy", "default", {"spec": {"engine": "keda"}})

    outcome = world.reconcile()

    assert not outcome.warnings, outcome.warnings
    per_deployment = world.autoscalers_per_deployment()
    assert per_deployment and all(k == ["ScaledObject"] for k in per_deployment.values()), (
        per_deployment
    )
