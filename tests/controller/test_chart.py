"""The Helm chart, checked by the real helm binary and strict Kubernetes schemas."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from recsys_operator import __version__
from recsys_operator.api.resources import RecommenderSystem, ScalingPolicy
from recsys_operator.controller.kube import KNOWN_KINDS
from recsys_operator.render import PRUNED_KINDS, RenderOptions, render_system
from recsys_operator.render.naming import default_image
from recsys_operator.tools import find_tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "recsys-operator"
pytestmark = pytest.mark.tools


def helm(*args: str) -> str:
    result = subprocess.run([find_tool("helm"), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def template(*sets: str) -> list[dict[str, Any]]:
    args = ["template", "demo", str(CHART), "--namespace", "recsys-system", "--include-crds"]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args)) if d]


def test_helm_lint_strict() -> None:
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART))


@pytest.mark.parametrize(
    "sets",
    [(), ("watchNamespaces={team-a,team-b}",), ("metrics.serviceMonitor.enabled=true",)],
    ids=["cluster-wide", "namespaced", "service-monitor"],
)
def test_rendered_chart_passes_strict_kubernetes_validation(sets: tuple[str, ...]) -> None:
    for obj in template(*sets):
        if obj["kind"] == "ServiceMonitor":
            continue  # a Prometheus Operator CRD: no upstream schema to check against
        kubernetes_validate.validate(obj, "1.35.0", strict=True)


def test_cluster_wide_install_uses_a_cluster_role_namespaced_uses_roles() -> None:
    kinds = [o["kind"] for o in template()]
    assert "ClusterRole" in kinds and "Role" not in kinds
    namespaced = template("watchNamespaces={team-a,team-b}")
    roles = [o["metadata"]["namespace"] for o in namespaced if o["kind"] == "Role"]
    assert roles == ["team-a", "team-b"]
    # Namespaced mode still needs a ClusterRole: Kopf lists CRDs and namespaces.
    cluster_role = next(o for o in namespaced if o["kind"] == "ClusterRole")
    resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert resources == {"customresourcedefinitions", "namespaces"}
    deployment = next(o for o in namespaced if o["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert (
        "--namespace=team-a" in args
        and "--namespace=team-b" in args
        and "--all-namespaces" not in args
    )


def test_rbac_is_least_privilege() -> None:
    role = next(o for o in template() if o["kind"] == "ClusterRole")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"]


def allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule.get("apiGroups", [])
        and resource in rule.get("resources", [])
        and verb in rule.get("verbs", [])
        and not rule.get("resourceNames")
        for rule in rules
    )


@pytest.mark.parametrize(
    "sets", [(), ("watchNamespaces={team-a}",)], ids=["cluster-wide", "namespaced"]
)
def test_the_operator_may_apply_every_child_and_grant_what_it_grants(sets: tuple[str, ...]) -> None:
    kind = "Role" if sets else "ClusterRole"
    role = next(o for o in template(*sets) if o["kind"] == kind)
    system = next(yaml.safe_load_all((ROOT / "examples" / "production-gpu.yaml").read_text()))
    policy = list(yaml.safe_load_all((ROOT / "examples" / "scaling-policy.yaml").read_text()))[1]
    children = render_system(
        RecommenderSystem.model_validate(system),
        ScalingPolicy.model_validate(policy),
        RenderOptions(monitoring=True),
    )
    for child in children:
        group = child["apiVersion"].rpartition("/")[0]
        plural, _ = KNOWN_KINDS[(child["apiVersion"], child["kind"])]
        pruned = (child["apiVersion"], child["kind"]) in PRUNED_KINDS
        for verb in ("get", "list", "watch", "create", "patch", "delete"):
            granted = allows(role["rules"], group, plural, verb)
            assert granted == (verb != "delete" or pruned), (child["kind"], verb)
    # RBAC escalation prevention: the operator may create a Role (and bind it) only when
    # it holds every permission in it itself.
    role_rules = [rule for child in children if child["kind"] == "Role" for rule in child["rules"]]
    assert role_rules
    for rule in role_rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert allows(role["rules"], group, resource, verb), (resource, verb)


def test_chart_ships_the_generated_crds() -> None:
    crds = {o["metadata"]["name"] for o in template() if o["kind"] == "CustomResourceDefinition"}
    assert crds == {"recommendersystems.recsys.dev", "scalingpolicies.recsys.dev"}


def test_image_references_agree_with_the_project_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert project == __version__ == chart["appVersion"]
    deployment = next(o for o in template() if o["kind"] == "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/recsys-operator/operator:{project}"
    assert default_image("serving").endswith(f"model-server:{project}")
    assert default_image("serving", gpu=True).endswith(f"model-server:{project}-gpu")
    assert default_image("features").endswith(f"stream-jobs:{project}")


def refused(*args: str) -> str:
    """stderr of a `helm template` that must fail."""
    command = [find_tool("helm"), "template", "demo", str(CHART), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stdout
    return result.stderr


def test_watch_namespace_patterns_are_refused_with_a_clear_message() -> None:
    assert "'team-*' does not match pattern" in refused("--set", "watchNamespaces={team-*}")
    # Past the schema (--skip-schema-validation), the template refuses it too.
    message = refused("--skip-schema-validation", "--set", "watchNamespaces={team-*}")
    assert '"team-*" is a pattern; RBAC needs each namespace by name' in message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("logLevel=verbose", "value must be one of 'debug', 'info', 'warning'"),
        ("replicaCount=2", "at '/replicaCount': value must be 1"),
        ("resyncSeconds=0", "at '/resyncSeconds'"),
        ("prometheusUrl=prometheus:9090", "at '/prometheusUrl'"),
        ("replicas=3", "additional properties 'replicas' not allowed"),
    ],
)
def test_the_values_schema_refuses_values_the_operator_cannot_run_with(
    value: str, message: str
) -> None:
    assert message in refused("--set", value)


def test_chart_rbac_rules_are_generated_from_the_code() -> None:
    from recsys_operator.rbac import CHART_RULES_FILE, chart_rules_template

    assert (ROOT / CHART_RULES_FILE).read_text() == chart_rules_template(), "run `recsys rbac`"
