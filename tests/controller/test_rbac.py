"""The chart grants exactly what the operator uses: every request it makes is allowed, and
every permission granted is used (or named below with where it is used).

The operator (Kopf and all) runs against the API emulator in each install mode through a
system's life: created with KEDA, a Pulsar Secret and monitoring; its policy switched to
hpa (pruning); one object of every child kind edited by hand (repaired through its
watch); deleted (finalizer). Each request the operator made is then checked against the
Role/ClusterRole `helm template` renders for that mode.
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubemock.fixtures import (
    KEDA_CRDS,
    PROMETHEUS_OPERATOR_CRDS,
    RAY_CRDS,
    KubeHandle,
    PulsarAdminHandle,
    wait_for,
)

from recsys_operator.controller import handlers
from recsys_operator.controller.kube import KNOWN_KINDS, resource_path
from recsys_operator.render import CHILD_KINDS
from recsys_operator.tools import find_tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "recsys-operator"
HANDLERS = "recsys_operator.controller.handlers"
pytestmark = [pytest.mark.tools, pytest.mark.xdist_group("operator")]
NS = "/apis/recsys.dev/v1alpha1/namespaces/default"
TEST_CLIENT = "Python-urllib"  # the test's own requests (setup, playing controllers)

Permission = tuple[str, str, str]  # (API group, resource[/subresource], verb)

# Granted, used by the operator, but not in this scenario:
NOT_EXERCISED_HERE = {
    # Read back only when a create meets 409 (another reconcile created it meanwhile).
    *{
        (api_version.rpartition("/")[0], KNOWN_KINDS[(api_version, kind)][0], "get")
        for api_version, kind in CHILD_KINDS
    },
    # Pruned when a rollout finishes (the canary track): tests/controller/test_operator.py.
    ("apps", "deployments", "delete"),
    ("", "configmaps", "delete"),
    ("", "services", "delete"),
    # Pruned when monitoring goes away: tests/controller/test_pruning.py.
    ("monitoring.coreos.com", "servicemonitors", "delete"),
    ("monitoring.coreos.com", "prometheusrules", "delete"),
    # Runs started by spec.training.triggers: tests/controller/test_training_triggers.py.
    ("batch", "jobs", "list"),
    ("batch", "jobs", "create"),
    ("ray.io", "rayjobs", "list"),
    ("ray.io", "rayjobs", "create"),
    # Checked by the OwnerReferencesPermissionEnforcement admission plugin, which the
    # emulator does not run (children's ownerReferences set blockOwnerDeletion).
    ("recsys.dev", "recommendersystems/finalizers", "update"),
}


def call(kube: KubeHandle, method: str, path: str, body: Any = None, patch: bool = False) -> Any:
    content = "application/merge-patch+json" if patch else "application/json"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        kube.url + path, data=data, method=method, headers={"Content-Type": content}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def rendered_roles(cluster_wide: bool) -> list[dict[str, Any]]:
    args = [find_tool("helm"), "template", "demo", str(CHART), "--namespace", "recsys-system"]
    if not cluster_wide:
        args += ["--set", "watchNamespaces={default}"]
    else:  # Secrets only where a system names one
        args += ["--set", "secretNamespaces={default}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d and d["kind"] in ("ClusterRole", "Role")]


def grants(roles: list[dict[str, Any]], namespace: str | None) -> set[Permission]:
    """What the roles allow in `namespace` (None: cluster-scoped or across namespaces)."""
    found = set()
    for role in roles:
        if role["kind"] == "Role" and role["metadata"]["namespace"] != namespace:
            continue
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    found |= {(group, resource, verb) for verb in rule["verbs"]}
    return found


def permission(request: Any) -> Permission | None:
    if request.resource is None or request.resource.plural is None:
        return None  # discovery: granted to every authenticated user
    resource = str(request.resource.plural)
    if request.subresource:
        resource += f"/{request.subresource}"
    method = request.method.value
    if method == "GET":
        if request.params.get("watch") in ("true", "1"):
            verb = "watch"
        else:
            verb = "get" if request.name else "list"
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]
    return (request.resource.group or "", resource, verb)


def live_children(kube: KubeHandle) -> dict[tuple[str, str], list[str]]:
    found = {}
    for api_version, kind in CHILD_KINDS:
        items = kube.get(resource_path(api_version, kind, "default"))["items"]
        found[(api_version, kind)] = [item["metadata"]["name"] for item in items]
    return found


def mark_deployments_ready(kube: KubeHandle) -> None:
    for deployment in kube.get("/apis/apps/v1/namespaces/default/deployments")["items"]:
        meta = deployment["metadata"]
        replicas = deployment["spec"].get("replicas", 1)
        status = {
            "observedGeneration": meta["generation"],
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
        }
        path = f"/apis/apps/v1/namespaces/default/deployments/{meta['name']}/status"
        call(kube, "PATCH", path, {"status": status}, patch=True)


def edit_one_of_every_kind(kube: KubeHandle) -> None:
    """A hand edit of one object of every kind there is: put back through that kind's watch."""
    for (api_version, kind), names in live_children(kube).items():
        if not names:
            continue
        path = resource_path(api_version, kind, "default", names[0])
        edit = {"metadata": {"labels": {"app.kubernetes.io/part-of": "x"}}}
        call(kube, "PATCH", path, edit, patch=True)

        def repaired(path: str = path) -> bool:
            labels = kube.get(path)["metadata"].get("labels", {})
            return labels.get("app.kubernetes.io/part-of") != "x"

        wait_for(repaired, timeout=30)


def run_scenario(kube: KubeHandle, pulsar: PulsarAdminHandle, start: Callable[[], Any]) -> None:
    kube.install_crds(*KEDA_CRDS, *PROMETHEUS_OPERATOR_CRDS, *RAY_CRDS)
    token = base64.b64encode(b"token").decode()
    call(
        kube,
        "POST",
        "/api/v1/namespaces/default/secrets",
        {"metadata": {"name": "pulsar"}, "data": {"token": token}},
    )
    pulsar.emulator.token = "token"
    policy = next(yaml.safe_load_all((ROOT / "examples" / "scaling-policy.yaml").read_text()))
    policy["spec"]["engine"] = "keda"
    call(kube, "POST", f"{NS}/scalingpolicies", policy)
    system = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    system["spec"]["events"]["adminUrl"] = pulsar.url
    system["spec"]["events"]["authSecretRef"] = {"name": "pulsar", "key": "token"}
    # Retraining too, so the CronJob is created, edited and pruned like the rest.
    system["spec"]["model"]["archiveUri"] = "pvc://models/retrieval/retrieval-1.mar"
    system["spec"]["training"] = {
        "logUri": "s3://event-log/quickstart",
        "modelStoreUri": "pvc://models/retrieval",
    }
    call(kube, "POST", f"{NS}/recommendersystems", system)
    start()

    def every_kind_exists() -> bool:
        mark_deployments_ready(kube)
        missing = [kind for kind, names in live_children(kube).items() if not names]
        # keda; training engine CronJob
        assert missing == [
            ("ray.io/v1", "RayCronJob"),
            ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ], missing
        return True

    wait_for(every_kind_exists, timeout=30)
    edit_one_of_every_kind(kube)
    # The engine switch prunes the ScaledObjects and the TriggerAuthentication.
    call(kube, "PATCH", f"{NS}/scalingpolicies/default", {"spec": {"engine": "hpa"}}, patch=True)

    def switched() -> bool:
        live = live_children(kube)
        hpas = live[("autoscaling/v2", "HorizontalPodAutoscaler")]
        return bool(hpas) and not live[("keda.sh/v1alpha1", "ScaledObject")]

    wait_for(switched, timeout=30)
    # The training engine switch prunes the CronJob for the RayCronJob.
    ray = {"image": "ray-trainer:2.52.0"}
    training = {"engine": "RayJob", "ray": ray}
    call(
        kube,
        "PATCH",
        f"{NS}/recommendersystems/quickstart",
        {"spec": {"training": training}},
        patch=True,
    )

    def on_ray() -> bool:
        live = live_children(kube)
        return bool(live[("ray.io/v1", "RayCronJob")]) and not live[("batch/v1", "CronJob")]

    wait_for(on_ray, timeout=30)
    edit_one_of_every_kind(kube)
    # Without a policy, the autoscalers and the disruption budgets are pruned; without
    # training, the RayCronJob.
    call(
        kube,
        "PATCH",
        f"{NS}/recommendersystems/quickstart",
        {"spec": {"scalingPolicyRef": None, "training": None}},
        patch=True,
    )

    def unscaled() -> bool:
        live = live_children(kube)
        return (
            not live[("autoscaling/v2", "HorizontalPodAutoscaler")]
            and not live[("policy/v1", "PodDisruptionBudget")]
            and not live[("ray.io/v1", "RayCronJob")]
        )

    wait_for(unscaled, timeout=30)
    call(kube, "DELETE", f"{NS}/recommendersystems/quickstart")

    def gone() -> bool:
        try:
            kube.get(f"{NS}/recommendersystems/quickstart")
        except urllib.error.HTTPError as exc:
            return exc.code == 404
        return False

    wait_for(gone, timeout=30)


@pytest.mark.parametrize("cluster_wide", [False, True], ids=["namespaced", "cluster-wide"])
def test_the_operator_uses_exactly_what_the_chart_grants(
    kube: KubeHandle,
    pulsar_admin: PulsarAdminHandle,
    run_operator: Callable[..., Any],
    cluster_wide: bool,
) -> None:
    handlers.STATE.analysis_source = None
    run_scenario(
        kube,
        pulsar_admin,
        lambda: run_operator(HANDLERS, namespaces=("default",), clusterwide=cluster_wide),
    )
    roles = rendered_roles(cluster_wide)
    used: set[Permission] = set()
    refused = []
    for request in kube.emulator.requests_since(0):
        agent = request.headers.get("User-Agent", "")
        needed = permission(request)
        if needed is None or agent.startswith(TEST_CLIENT):
            continue
        used.add(needed)
        if needed not in grants(roles, request.namespace):
            refused.append(f"{request.method.value} {request.url.path_qs} needs {needed}")
    assert not refused, "\n".join(sorted(set(refused)))
    granted = grants(roles, None) | grants(roles, "default")
    assert granted - used == NOT_EXERCISED_HERE - used, sorted(granted - used - NOT_EXERCISED_HERE)
    assert not (NOT_EXERCISED_HERE - granted), "NOT_EXERCISED_HERE names what is not granted"


def helm_roles(*values: str) -> list[dict[str, Any]]:
    args = [find_tool("helm"), "template", "demo", str(CHART), "--namespace", "recsys-system"]
    for value in values:
        args += ["--set", value]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d and d["kind"] in ("ClusterRole", "Role")]


def secret_grants(roles: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Where each role lets the operator touch Secrets: namespace ("*" for the
    ClusterRole) -> verbs."""
    found: dict[str, set[str]] = {}
    for role in roles:
        where = role["metadata"].get("namespace", "*") if role["kind"] == "Role" else "*"
        for rule in role["rules"]:
            if "" in rule["apiGroups"] and "secrets" in rule["resources"]:
                assert "resourceNames" not in rule
                found.setdefault(where, set()).update(rule["verbs"])
    return found


def test_the_operator_can_read_secrets_only_in_the_namespaces_it_is_given() -> None:
    """No ClusterRole grants Secrets: cluster-wide, only `secretNamespaces` get a Role."""
    assert secret_grants(helm_roles()) == {}
    assert secret_grants(helm_roles("secretNamespaces={team-a,team-b}")) == {
        "team-a": {"get"},
        "team-b": {"get"},
    }
    assert secret_grants(helm_roles("watchNamespaces={default,shop}")) == {
        "default": {"get"},
        "shop": {"get"},
    }
    both = [find_tool("helm"), "template", "demo", str(CHART)]
    both += ["--set", "watchNamespaces={a}", "--set", "secretNamespaces={b}"]
    result = subprocess.run(both, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "secretNamespaces is for cluster-wide" in result.stderr
