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
    assert roles == ["team-a", "team-b"] and "ClusterRole" not in [o["kind"] for o in namespaced]
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
