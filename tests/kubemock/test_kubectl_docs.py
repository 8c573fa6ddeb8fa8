"""The real kubectl against the emulator, in every command form the docs tell users to run.

The forms come from docs/ (`grep -rho 'kubectl [a-z]*' docs/`): get, describe, annotate,
patch, wait, delete on `recsys NAME`; lists with printer columns; events by field
selector; deployments, autoscalers and scale. `logs` and `port-forward` need pods, which
the emulator has none of. `test_every_docs_command_form_is_covered` keeps this list honest
when the docs grow a new form.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from recsys_operator.tools import find_tool

from .fixtures import KEDA_CRDS, REPO_ROOT, KubeHandle, wait_for

pytestmark = pytest.mark.tools

EXAMPLES = REPO_ROOT / "examples"
SYSTEMS = "/apis/recsys.dev/v1alpha1/namespaces/default/recommendersystems"
# The kubectl subcommands the docs use, and those this module runs.
COVERED = {"get", "describe", "annotate", "patch", "wait", "delete", "apply", "rollout", "scale"}
# `create job --from=cronjob/...` (docs/retraining.md) runs in
# tests/controller/test_training_triggers.py, next to the Job the triggers make.
COVERED |= {"create"}
NEEDS_PODS = {"logs", "port-forward"}


def patch_json(kube: KubeHandle, path: str, patch: dict[str, Any]) -> Any:
    import urllib.request

    request = urllib.request.Request(
        kube.url + path,
        data=json.dumps(patch).encode(),
        headers={"Content-Type": "application/merge-patch+json"},
        method="PATCH",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def ready_status(weight: int = 5) -> dict[str, Any]:
    return {
        "status": {
            "stableVersion": "1",
            "canary": {"version": "2", "weight": weight},
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "RolloutProgressing"},
            ],
        }
    }


def event(name: str, reason: str, uid: str = "") -> dict[str, Any]:
    return {
        "metadata": {"name": f"{name}.{reason.lower()}", "namespace": "default"},
        "involvedObject": {
            "apiVersion": "recsys.dev/v1alpha1",
            "kind": "RecommenderSystem",
            "name": name,
            "namespace": "default",
            "uid": uid,
        },
        "reason": reason,
        "message": f"{reason} happened",
        "type": "Normal",
        "count": 1,
        "source": {"component": "recsys-operator"},
    }


@pytest.fixture
def system(kube: KubeHandle) -> KubeHandle:
    """The quickstart and its scaling policies applied with kubectl, its status as Ready."""
    policy, quickstart = EXAMPLES / "scaling-policy.yaml", EXAMPLES / "quickstart.yaml"
    kube.kubectl("apply", "--validate=false", "-f", str(policy), "-f", str(quickstart))
    patch_json(kube, f"{SYSTEMS}/quickstart/status", ready_status())
    return kube


def test_get_recsys_name_is_one_resource_with_its_printer_columns(system: KubeHandle) -> None:
    listed = system.kubectl("get", "recsys").stdout.splitlines()
    assert re.split(r"\s+", listed[0].strip()) == [
        "NAME",
        "READY",
        "STABLE",
        "CANARY",
        "WEIGHT",
        "AGE",
    ]
    assert re.split(r"\s+", listed[1].strip())[:5] == ["quickstart", "True", "1", "2", "5"]
    assert len(listed) == 2  # ScalingPolicies are not RecommenderSystems

    one = system.kubectl("get", "recsys", "quickstart").stdout
    assert one.split("\n")[1].startswith("quickstart")
    wide = system.kubectl("get", "recsys", "-o", "wide", "-n", "default").stdout
    assert "REASON" in wide.splitlines()[0] and "RolloutProgressing" in wide
    as_yaml = yaml.safe_load(system.kubectl("get", "recsys", "quickstart", "-o", "yaml").stdout)
    assert as_yaml["kind"] == "RecommenderSystem" and as_yaml["status"]["stableVersion"] == "1"
    path = '{.status.conditions[?(@.type=="Ready")].reason}'
    jsonpath = system.kubectl("get", "recsys", "quickstart", "-o", f"jsonpath={path}").stdout
    assert jsonpath == "RolloutProgressing"


def test_scaling_policies_and_the_category_of_both_kinds(system: KubeHandle) -> None:
    policies = system.kubectl("get", "scalingpolicies", "-n", "default").stdout.splitlines()
    assert re.split(r"\s+", policies[0].strip()) == ["NAME", "READY", "ENGINE", "AGE"]
    assert {line.split()[0] for line in policies[1:]} == {"default"}
    one = yaml.safe_load(system.kubectl("get", "scalingpolicy", "default", "-o", "yaml").stdout)
    assert one["kind"] == "ScalingPolicy"
    both = system.kubectl("get", "recsys-all").stdout
    assert "recommendersystem.recsys.dev/quickstart" in both
    assert "scalingpolicy.recsys.dev/default" in both
    crds = system.kubectl(
        "get", "crd", "recommendersystems.recsys.dev", "scalingpolicies.recsys.dev"
    )
    assert len(crds.stdout.splitlines()) == 3


def test_describe_shows_conditions_and_events_of_that_system_only(system: KubeHandle) -> None:
    uid = system.get(f"{SYSTEMS}/quickstart")["metadata"]["uid"]
    system.post("/api/v1/namespaces/default/events", event("quickstart", "RolloutStarted", uid))
    system.post("/api/v1/namespaces/default/events", event("other", "RolledBack"))
    described = system.kubectl("describe", "recsys", "quickstart").stdout
    assert "Stable Version:  1" in described
    assert "RolloutStarted" in described and "RolledBack" not in described


def test_events_by_involved_object_and_reason(system: KubeHandle) -> None:
    for reason in ("RolloutStarted", "RolledBack"):
        system.post("/api/v1/namespaces/default/events", event("quickstart", reason))
    system.post("/api/v1/namespaces/default/events", event("home", "RolledBack"))
    selector = "involvedObject.name=quickstart,reason=RolledBack"
    found = system.kubectl("get", "events", "--field-selector", selector, "-o", "json").stdout
    reasons = [(e["involvedObject"]["name"], e["reason"]) for e in json.loads(found)["items"]]
    assert reasons == [("quickstart", "RolledBack")]
    unsupported = system.kubectl("get", "events", "--field-selector", "spec.x=1", check=False)
    assert unsupported.returncode != 0 and "field label not supported" in unsupported.stderr


def test_annotate_patch_wait_and_delete_recsys_name(system: KubeHandle) -> None:
    action = "recsys.dev/rollout-action"
    system.kubectl("annotate", "recsys", "quickstart", f"{action}=promote")
    system.kubectl("annotate", "recsys", "quickstart", f"{action}=abort", "--overwrite")
    paused = '{"spec":{"rollout":{"paused":true}}}'
    system.kubectl("patch", "recsys", "quickstart", "--type", "merge", "-p", paused)
    body = system.get(f"{SYSTEMS}/quickstart")
    assert body["metadata"]["annotations"][action] == "abort"
    assert body["spec"]["rollout"]["paused"] is True

    waited = system.kubectl("wait", "recsys/quickstart", "--for=condition=Ready", "--timeout=20s")
    assert "condition met" in waited.stdout
    system.kubectl("delete", "recsys", "quickstart")
    gone = system.kubectl("get", "recsys", "quickstart", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_get_watch_prints_a_row_per_change(system: KubeHandle) -> None:
    cache = system.kubeconfig.parent / "kubectl-cache"
    command = [find_tool("kubectl"), f"--kubeconfig={system.kubeconfig}", f"--cache-dir={cache}"]
    watching = subprocess.Popen(
        [*command, "get", "recsys", "quickstart", "-w", "--request-timeout=30s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert watching.stdout is not None
    stdout = watching.stdout
    reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")))
    reader.start()
    try:
        wait_for(lambda: system.emulator.open_watches > 0 or watching.poll() is not None)
        assert watching.poll() is None, watching.communicate()
        patch_json(system, f"{SYSTEMS}/quickstart/status", ready_status(weight=30))
        wait_for(lambda: len(lines) >= 3)
    finally:
        watching.terminate()
        watching.wait(10)
        reader.join(10)
    rows = [re.split(r"\s+", line.strip()) for line in lines]
    assert rows[0][0] == "NAME", lines
    assert [row[4] for row in rows[1:]] == ["5", "30"], lines


def test_deployments_autoscalers_rollout_status_and_scale(kube: KubeHandle) -> None:
    kube.install_crds(*KEDA_CRDS)
    labels = {"app.kubernetes.io/instance": "quickstart", "app.kubernetes.io/component": "serving"}
    deployment = {
        "metadata": {"name": "quickstart-serving", "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "torchserve", "image": "torchserve"}]},
            },
        },
    }
    deployments = "/apis/apps/v1/namespaces/default/deployments"
    kube.post(deployments, deployment)
    done = {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}
    patch_json(kube, f"{deployments}/quickstart-serving/status", {"status": done})
    assert "quickstart-serving" in kube.kubectl("get", "deploy", "quickstart-serving").stdout
    status = kube.kubectl("rollout", "status", "deploy/quickstart-serving", "--timeout=10s")
    assert "successfully rolled out" in status.stdout

    kube.kubectl("scale", "deploy", "quickstart-serving", "--replicas=3")
    assert kube.get(f"{deployments}/quickstart-serving")["spec"]["replicas"] == 3
    scale = kube.get(f"{deployments}/quickstart-serving/scale")
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3

    selector = ",".join(f"{key}={value}" for key, value in labels.items())
    pods = kube.kubectl("get", "pods", "-l", selector)
    assert "No resources found" in pods.stderr

    hpa = {
        "metadata": {"name": "quickstart-features"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
            "minReplicas": 1,
            "maxReplicas": 4,
        },
    }
    kube.post("/apis/autoscaling/v2/namespaces/default/horizontalpodautoscalers", hpa)
    assert "quickstart-features" in kube.kubectl("get", "hpa", "quickstart-features").stdout
    scaled = {"metadata": {"name": "quickstart-serving"}, "spec": {"scaleTargetRef": {"name": "x"}}}
    kube.post("/apis/keda.sh/v1alpha1/namespaces/default/scaledobjects", scaled)
    assert "quickstart-serving" in kube.kubectl("get", "scaledobject", "quickstart-serving").stdout
    described = kube.kubectl("describe", "scaledobject", "quickstart-serving").stdout
    assert "Scale Target Ref" in described


def test_every_docs_command_form_is_covered() -> None:
    used = set()
    for path in [*Path(REPO_ROOT / "docs").rglob("*.md"), REPO_ROOT / "README.md"]:
        for match in re.finditer(r"kubectl (?:-n [\w-]+ )?([a-z][\w-]*)", path.read_text()):
            used.add(match.group(1))
    missing = used - COVERED - NEEDS_PODS
    assert not missing, f"docs use kubectl {sorted(missing)}: add them to this module"
