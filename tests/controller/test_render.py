"""The render functions: every object is valid Kubernetes, and says what the spec asks."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from gateway.routing_configmap import ConfigMapRef
from recsys_contracts.routing import ROUTING_KEY
from recsys_operator import __version__
from recsys_operator.api import InvalidResource
from recsys_operator.api.resources import RecommenderSystem, ScalingPolicy
from recsys_operator.controller.kube import KNOWN_KINDS
from recsys_operator.render import RenderOptions, render_system, topic_plan
from recsys_operator.render.naming import CONFIG_HASH_ANNOTATION
from recsys_operator.tools import find_tool

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.35.0"
# Custom resources of other projects: kubernetes-validate has no schema for them.
FOREIGN_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}


def load(name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((ROOT / "examples" / name).read_text()))


def quickstart(**status: Any) -> RecommenderSystem:
    doc = copy.deepcopy(load("quickstart.yaml")[0])
    if status:
        doc["status"] = status
    return RecommenderSystem.model_validate(doc)


def production(**status: Any) -> RecommenderSystem:
    doc = copy.deepcopy(load("production-gpu.yaml")[0])
    if status:
        doc["status"] = status
    return RecommenderSystem.model_validate(doc)


HPA_POLICY = ScalingPolicy.model_validate(load("scaling-policy.yaml")[0])
KEDA_POLICY = ScalingPolicy.model_validate(load("scaling-policy.yaml")[1])
CANARY = {
    "stableVersion": "2026-11-01",
    "stableArchiveUri": "s3://ml-models/home-feed/old.mar",
    "canary": {"version": "2026-11-20", "weight": 25, "step": 2},
}


def by_kind(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        out.setdefault(obj["kind"], []).append(obj)
    return out


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


SCENARIOS = {
    "quickstart-hpa": lambda: render_system(quickstart(), HPA_POLICY),
    "quickstart-no-policy": lambda: render_system(
        RecommenderSystem.model_validate(
            {
                **load("quickstart.yaml")[0],
                "spec": {
                    k: v
                    for k, v in load("quickstart.yaml")[0]["spec"].items()
                    if k != "scalingPolicyRef"
                },
            }
        )
    ),
    "production-keda-canary-monitoring": lambda: render_system(
        production(**CANARY), KEDA_POLICY, RenderOptions(monitoring=True)
    ),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_rendered_object_passes_strict_kubernetes_validation(scenario: str) -> None:
    objects = SCENARIOS[scenario]()
    validated = 0
    for obj in objects:
        if obj["kind"] in FOREIGN_KINDS:
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        validated += 1
    assert validated >= 7


def test_quickstart_renders_the_expected_children() -> None:
    objects = render_system(quickstart(), HPA_POLICY)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert names == {
        ("ConfigMap", "quickstart-gateway"),
        ("ServiceAccount", "quickstart-gateway"),
        ("Role", "quickstart-gateway"),
        ("RoleBinding", "quickstart-gateway"),
        ("NetworkPolicy", "quickstart-serving"),
        ("NetworkPolicy", "quickstart-features"),
        ("NetworkPolicy", "quickstart-gateway"),
        ("NetworkPolicy", "quickstart-default-deny"),
        ("ConfigMap", "quickstart-serving"),
        ("Service", "quickstart-serving"),
        ("Deployment", "quickstart-serving"),
        ("Service", "quickstart-gateway"),
        ("Deployment", "quickstart-gateway"),
        ("Deployment", "quickstart-features"),
        ("HorizontalPodAutoscaler", "quickstart-serving"),
        ("HorizontalPodAutoscaler", "quickstart-gateway"),
        ("HorizontalPodAutoscaler", "quickstart-features"),
        ("PodDisruptionBudget", "quickstart-serving"),
        ("PodDisruptionBudget", "quickstart-gateway"),
        ("PodDisruptionBudget", "quickstart-features"),
    }
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "quickstart"
        assert labels["app.kubernetes.io/managed-by"] == "recsys-operator"
        assert obj["metadata"]["namespace"] == "default"
        assert "ownerReferences" not in obj["metadata"]  # no uid: not from a live resource


def test_render_is_deterministic() -> None:
    assert render_system(production(**CANARY), KEDA_POLICY) == render_system(
        production(**CANARY), KEDA_POLICY
    )


def test_children_are_owned_by_a_live_resource() -> None:
    doc = load("quickstart.yaml")[0]
    doc["metadata"]["uid"] = "0b5e-42"
    for obj in render_system(RecommenderSystem.model_validate(doc), HPA_POLICY):
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "recsys.dev/v1alpha1",
            "kind": "RecommenderSystem",
            "name": "quickstart",
            "uid": "0b5e-42",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_torchserve_config_follows_the_spec() -> None:
    objects = render_system(production(), KEDA_POLICY)
    config = named(objects, "ConfigMap", "home-feed-serving")["data"]["config.properties"]
    props = dict(
        line.split("=", 1)
        for line in config.splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert props["disable_token_authorization"] == "true"
    assert props["metrics_mode"] == "prometheus"
    assert "-Xmx4096m" in props["vmargs"]  # 25% of 16Gi, capped at 4 GiB
    models = json.loads(props["models"])["home-feed-retrieval"]["2026-11-20"]
    assert (models["batchSize"], models["maxBatchDelay"], models["minWorkers"]) == (64, 4, 2)


def serving_properties(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    config = named(objects, "ConfigMap", name)["data"]["config.properties"]
    return dict(
        line.split("=", 1)
        for line in config.splitlines()
        if "=" in line and not line.startswith("#")
    )


def test_torchserve_management_listens_only_on_loopback_in_pods() -> None:
    """Token auth is off, so the management API (unload, scale workers) must be out of
    other pods' reach; inference (the gateway) and metrics (Prometheus) stay reachable."""
    objects = render_system(production(**CANARY), KEDA_POLICY)
    for name in ("home-feed-serving", "home-feed-serving-canary"):
        props = serving_properties(objects, name)
        assert props["management_address"] == "http://127.0.0.1:8081"
        assert props["grpc_management_address"] == "127.0.0.1"
        assert props["inference_address"] == "http://0.0.0.0:8080"
        assert props["metrics_address"] == "http://0.0.0.0:8082"
        (container,) = named(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert {p["name"] for p in container["ports"]} == {"inference", "metrics"}


def test_gpu_serving_gets_gpus_node_selector_tolerations_and_the_gpu_image() -> None:
    deployment = named(render_system(production(), KEDA_POLICY), "Deployment", "home-feed-serving")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"] == f"ghcr.io/recsys-operator/model-server:{__version__}-gpu"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OMP_NUM_THREADS"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ping"


def test_a_config_change_rolls_the_pods_and_nothing_else_does() -> None:
    def serving_hash(system: RecommenderSystem) -> str:
        deployment = named(render_system(system, HPA_POLICY), "Deployment", "quickstart-serving")
        return deployment["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]

    doc = load("quickstart.yaml")[0]
    before = serving_hash(RecommenderSystem.model_validate(doc))
    assert serving_hash(RecommenderSystem.model_validate(copy.deepcopy(doc))) == before
    doc["spec"]["serving"]["batching"]["maxBatchSize"] = 64
    assert serving_hash(RecommenderSystem.model_validate(doc)) != before


@pytest.mark.parametrize(
    ("uri", "image", "command_start"),
    [
        ("https://models.example/retrieval-1.mar", "curlimages/curl", ["curl", "--fail"]),
        ("s3://bucket/retrieval-1.mar", "amazon/aws-cli", ["aws", "s3", "cp"]),
        (
            "pvc://model-claim/releases/retrieval-1.mar",
            "busybox",
            ["cp", "/source/releases/retrieval-1.mar"],
        ),
    ],
)
def test_archives_are_fetched_by_an_init_container(
    uri: str, image: str, command_start: list[str]
) -> None:
    doc = load("quickstart.yaml")[0]
    doc["spec"]["model"]["archiveUri"] = uri
    deployment = named(
        render_system(RecommenderSystem.model_validate(doc), HPA_POLICY),
        "Deployment",
        "quickstart-serving",
    )
    (fetch,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert fetch["image"].startswith(image)
    assert fetch["command"][: len(command_start)] == command_start
    assert (
        fetch["command"][-1].endswith("/model-store/retrieval-1.mar") or fetch["command"][-1] == uri
    )
    assert uri in fetch["command"] or uri.startswith("pvc://")
    if uri.startswith("pvc://"):
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert {
            "name": "archive-source",
            "persistentVolumeClaim": {"claimName": "model-claim", "readOnly": True},
        } in volumes


@pytest.mark.parametrize("uri", ["file:///tmp/retrieval-1.mar", None])
def test_archives_a_cluster_cannot_fetch_are_a_spec_error(uri: str | None) -> None:
    doc = load("quickstart.yaml")[0]
    doc["spec"]["model"]["archiveUri"] = uri
    with pytest.raises(InvalidResource) as info:
        render_system(RecommenderSystem.model_validate(doc), HPA_POLICY)
    assert info.value.issues[0].path == "spec.model.archiveUri"


def test_a_canary_gets_its_own_serving_set_and_its_weight_in_the_routing() -> None:
    objects = render_system(production(**CANARY), KEDA_POLICY)
    canary = named(objects, "Deployment", "home-feed-serving-canary")
    stable = named(objects, "Deployment", "home-feed-serving")
    assert canary["metadata"]["labels"]["recsys.dev/model-version"] == "2026-11-20"
    assert stable["metadata"]["labels"]["recsys.dev/model-version"] == "2026-11-01"
    assert canary["spec"]["replicas"] == 1  # 25% of 4 replicas
    assert "replicas" not in stable["spec"]  # the autoscaler owns it
    stable_fetch = stable["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert "s3://ml-models/home-feed/old.mar" in stable_fetch
    routing = json.loads(named(objects, "ConfigMap", "home-feed-gateway")["data"]["routing.json"])
    assert routing["canaryWeight"] == 25
    assert routing["canary"]["url"].endswith("/predictions/home-feed-retrieval/2026-11-20")
    # Stable names no version: its pods keep answering while they roll at a promotion.
    assert (
        routing["stable"]["url"]
        == "http://home-feed-serving.recsys-prod.svc:8080/predictions/home-feed-retrieval"
    )


def test_the_gateways_in_flight_limit_comes_from_the_spec_through_the_routing() -> None:
    doc = copy.deepcopy(load("production-gpu.yaml")[0])
    doc.setdefault("spec", {}).setdefault("gateway", {})["maxInFlight"] = 12
    objects = render_system(RecommenderSystem.model_validate(doc), KEDA_POLICY)
    routing = json.loads(named(objects, "ConfigMap", "home-feed-gateway")["data"]["routing.json"])
    assert routing["maxInFlight"] == 12
    default = render_system(production(), KEDA_POLICY)
    routing = json.loads(named(default, "ConfigMap", "home-feed-gateway")["data"]["routing.json"])
    assert routing["maxInFlight"] == 64


def test_the_gateway_watches_its_routing_configmap_and_may_read_nothing_else() -> None:
    objects = render_system(production(**CANARY), KEDA_POLICY)
    configmap = named(objects, "ConfigMap", "home-feed-gateway")
    assert json.loads(configmap["data"][ROUTING_KEY])["canaryWeight"] == 25

    pod = named(objects, "Deployment", "home-feed-gateway")["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    where = args[args.index("--routing-configmap") + 1]
    assert ConfigMapRef.parse(where) == ConfigMapRef("recsys-prod", "home-feed-gateway")
    assert "--routing" not in args  # no mounted copy to go stale:
    assert not [v for v in pod.get("volumes", []) if "configMap" in v]
    assert pod["serviceAccountName"] == "home-feed-gateway"
    assert pod["automountServiceAccountToken"] is True

    role = named(objects, "Role", "home-feed-gateway")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["home-feed-gateway"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = named(objects, "RoleBinding", "home-feed-gateway")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "home-feed-gateway",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "home-feed-gateway", "namespace": "recsys-prod"}
    ]
    # Applied in this order, the pods never start before their identity and rights exist.
    order = [(o["kind"], o["metadata"]["name"]) for o in objects]
    deployment = order.index(("Deployment", "home-feed-gateway"))
    for kind in ("ConfigMap", "ServiceAccount", "Role", "RoleBinding"):
        assert order.index((kind, "home-feed-gateway")) < deployment


def test_every_rendered_kind_can_be_applied() -> None:
    for scenario in SCENARIOS.values():
        for obj in scenario():
            assert (obj["apiVersion"], obj["kind"]) in KNOWN_KINDS, obj["kind"]


def test_hpa_bounds_and_behaviour_come_from_the_effective_policy() -> None:
    doc = load("quickstart.yaml")[0]
    doc["spec"]["scaling"] = {"maxReplicas": 5}
    objects = render_system(RecommenderSystem.model_validate(doc), HPA_POLICY)
    hpa = named(objects, "HorizontalPodAutoscaler", "quickstart-serving")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 5)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert hpa["behavior"]["scaleDown"]["policies"] == [
        {"type": "Percent", "value": 50, "periodSeconds": 60}
    ]


def test_keda_scales_serving_on_latency_and_gpu_and_stream_jobs_on_backlog() -> None:
    objects = render_system(production(), KEDA_POLICY)
    serving = named(objects, "ScaledObject", "home-feed-serving")["spec"]
    assert (serving["minReplicaCount"], serving["maxReplicaCount"]) == (
        4,
        24,
    )  # tightened by the system
    triggers = {t.get("name", t["type"]): t for t in serving["triggers"]}
    assert triggers["p99-latency"]["metadata"]["threshold"] == "35"
    assert "histogram_quantile(0.99" in triggers["p99-latency"]["metadata"]["query"]
    assert triggers["gpu-utilization"]["metadata"]["threshold"] == "75"
    # The GPU query averages the stable pods only (PromQL regexes match the whole value).
    pod_regex = re.search(r'pod=~"([^"]+)"', triggers["gpu-utilization"]["metadata"]["query"])
    assert pod_regex is not None
    assert re.fullmatch(pod_regex[1], "home-feed-serving-7d9f8b6c5-x2x7q")
    assert not re.fullmatch(pod_regex[1], "home-feed-serving-canary-7d9f8b6c5-x2x7q")
    features = named(objects, "ScaledObject", "home-feed-features")["spec"]
    (pulsar,) = features["triggers"]
    assert pulsar["type"] == "pulsar"
    assert pulsar["metadata"]["msgBacklogThreshold"] == "10000"
    assert pulsar["metadata"]["topic"] == "persistent://discovery/home-feed/interactions"
    assert pulsar["authenticationRef"] == {"name": "home-feed-pulsar-auth"}
    auth = named(objects, "TriggerAuthentication", "home-feed-pulsar-auth")["spec"]
    assert auth["secretTargetRef"] == [
        {"parameter": "bearerToken", "name": "pulsar-token", "key": "token"}
    ]


def test_keda_policy_without_keda_in_the_cluster_is_an_error() -> None:
    with pytest.raises(InvalidResource, match="keda"):
        render_system(production(), KEDA_POLICY, RenderOptions(keda=False))


def test_a_missing_or_exceeded_policy_renders_nothing() -> None:
    with pytest.raises(InvalidResource, match="not found"):
        render_system(quickstart(), None)
    doc = load("quickstart.yaml")[0]
    doc["spec"]["scaling"] = {"maxReplicas": 50}
    with pytest.raises(InvalidResource) as info:
        render_system(RecommenderSystem.model_validate(doc), HPA_POLICY)
    assert info.value.issues[0].path == "spec.scaling.maxReplicas"


def test_stream_job_gets_the_pulsar_and_redis_settings() -> None:
    deployment = named(render_system(production(), KEDA_POLICY), "Deployment", "home-feed-features")
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert (
        env["RECSYS_INTERACTIONS_TOPIC"]["value"] == "persistent://discovery/home-feed/interactions"
    )
    assert env["RECSYS_SUBSCRIPTION_TYPE"]["value"] == "KeyShared"
    assert env["RECSYS_REDIS_URL"]["value"] == "redis://feature-store.recsys-prod:6379/0"
    assert env["RECSYS_PULSAR_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "pulsar-token", "key": "token"}
    }
    assert env["RECSYS_REDIS_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "feature-store", "key": "password"}
    }
    assert pod["terminationGracePeriodSeconds"] >= 30  # time to drain a batch on SIGTERM


def test_topic_plan_names_every_topic_with_its_policy() -> None:
    plan = topic_plan(production())
    assert (plan.tenant, plan.namespace) == ("discovery", "home-feed")
    assert [(t.name, t.partitions) for t in plan.topics] == [
        ("interactions", 32),
        ("impressions", 32),
        ("dead-letter", 2),
    ]
    assert topic_plan(quickstart()).namespace == "default-quickstart"


@pytest.mark.prometheus
def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    rule = named(
        render_system(production(), KEDA_POLICY, RenderOptions(monitoring=True)),
        "PrometheusRule",
        "home-feed-alerts",
    )
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run(
        [find_tool("promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_the_stream_job_keeps_every_served_version_fresh() -> None:
    """During a rollout both versions' online embeddings are updated; after a rollback
    the stable one's still are (not the rolled-back version the spec still names)."""
    from recsys_contracts.feature_job_settings import FeatureJobSettings

    def archives(system: RecommenderSystem) -> dict[str, str]:
        deployment = named(render_system(system, KEDA_POLICY), "Deployment", "home-feed-features")
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        values = {e["name"]: e["value"] for e in env if "value" in e}
        return FeatureJobSettings.from_env(values).model_archives

    canary_uri = "s3://ml-models/home-feed/home-feed-retrieval-2026-11-20.mar"
    assert archives(production(**CANARY)) == {
        "2026-11-01": "s3://ml-models/home-feed/old.mar",
        "2026-11-20": canary_uri,
    }
    rolled_back = {k: v for k, v in CANARY.items() if k != "canary"}
    assert archives(production(**rolled_back)) == {"2026-11-01": "s3://ml-models/home-feed/old.mar"}


def test_the_stream_job_accepts_the_rendered_configuration() -> None:
    """The Deployment's env is exactly what `recsys features run` reads (one contract)."""
    from recsys_contracts.feature_job_settings import FeatureJobSettings

    deployment = named(render_system(production(), KEDA_POLICY), "Deployment", "home-feed-features")
    env = {
        e["name"]: e["value"]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if "value" in e
    }
    env["RECSYS_PULSAR_TOKEN"] = "t"  # from the Secret at run time
    settings = FeatureJobSettings.from_env(env)
    assert settings.interactions_topic == "persistent://discovery/home-feed/interactions"
    assert settings.subscription_type.value == "KeyShared"
    assert settings.windows == ["15m", "1h", "24h"] and settings.last_n == 100
    assert settings.store_ttl_seconds == 336 * 3600
    assert settings.model_archives == {
        "2026-11-20": "s3://ml-models/home-feed/home-feed-retrieval-2026-11-20.mar"
    }
    assert not [
        name
        for name in env
        if name.startswith("RECSYS_")
        and name.removeprefix("RECSYS_").lower() not in FeatureJobSettings.model_fields
    ]


def test_serving_pods_tell_the_handler_its_limits() -> None:
    deployment = named(render_system(production(), KEDA_POLICY), "Deployment", "home-feed-serving")
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["RECSYS_MAX_K"] == "100" and env["RECSYS_QUANTIZE_TOWER"] == "false"
    assert env["RECSYS_CACHE_MAX_ENTRIES"] == "10000" and env["RECSYS_CACHE_TTL_MS"] == "60000"
    assert (
        env["RECSYS_SYSTEM_ID"] == "recsys-prod.home-feed"
        and env["RECSYS_MODEL_VERSION"] == "2026-11-20"
    )


def test_the_gateway_reads_its_request_id_keys_from_the_named_secret() -> None:
    doc = load("quickstart.yaml")[0]
    doc["spec"].setdefault("gateway", {})["requestIdKeys"] = {"secretName": "gateway-keys"}
    env = gateway_env(render_system(RecommenderSystem.model_validate(doc), HPA_POLICY))
    assert env["RECSYS_GATEWAY_REQUEST_ID_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "gateway-keys", "key": "current", "optional": False}
    }
    assert env["RECSYS_GATEWAY_REQUEST_ID_PREVIOUS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "gateway-keys", "key": "previous", "optional": True}
    }
    without = gateway_env(render_system(quickstart(), HPA_POLICY))
    assert "RECSYS_GATEWAY_REQUEST_ID_KEY" not in without


def gateway_env(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    deployment = next(
        r
        for r in resources
        if r["kind"] == "Deployment" and r["metadata"]["name"].endswith("-gateway")
    )
    return {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] == "Deployment"
    }


def test_only_the_gateway_pods_get_a_service_account_token() -> None:
    """Serving and the feature job never call the Kubernetes API: no token to steal."""
    pods = pod_specs(render_system(production(**CANARY), KEDA_POLICY))
    assert set(pods) == {
        "home-feed-serving",
        "home-feed-serving-canary",
        "home-feed-gateway",
        "home-feed-features",
    }
    for name, pod in pods.items():
        assert pod["automountServiceAccountToken"] is (name == "home-feed-gateway"), name
    assert pods["home-feed-gateway"]["serviceAccountName"] == "home-feed-gateway"


@pytest.mark.parametrize("uri", ["s3://m/a.mar", "https://m/a.mar", "pvc://claim/a.mar"])
def test_every_container_has_a_read_only_root_and_explicit_writable_mounts(uri: str) -> None:
    doc = copy.deepcopy(load("production-gpu.yaml")[0])
    doc["spec"]["model"]["archiveUri"] = uri
    pods = pod_specs(render_system(RecommenderSystem.model_validate(doc), KEDA_POLICY))
    writable: dict[str, set[str]] = {}
    for name, pod in pods.items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
        for container in pod.get("initContainers", []) + pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            mounts = container["volumeMounts"]
            assert {"name": "tmp", "mountPath": "/tmp"} in mounts
            for mount in mounts:
                assert mount["name"] in volumes  # every mount has its volume
                if not mount.get("readOnly"):
                    writable.setdefault(f"{name}/{container['name']}", set()).add(
                        mount["mountPath"]
                    )
    # TorchServe writes its model store, its log folder (under the image's WORKDIR) and
    # /tmp (unpacked archives, worker sockets); the fetcher writes the model store
    # (and the AWS CLI its cache under HOME=/tmp); the others only /tmp.
    assert writable["home-feed-serving/torchserve"] == {
        "/tmp",
        "/home/model-server/model-store",
        "/home/model-server/logs",
    }
    assert writable["home-feed-serving/fetch-archive"] == {
        "/tmp",
        "/home/model-server/model-store",
    }
    assert writable["home-feed-gateway/gateway"] == {"/tmp"}
    assert writable["home-feed-features/features"] == {"/tmp"}
    serving = pods["home-feed-serving"]
    props = serving_properties(
        render_system(RecommenderSystem.model_validate(doc), KEDA_POLICY), "home-feed-serving"
    )
    assert props["model_store"] == "/home/model-server/model-store"
    assert {v["name"]: v for v in serving["volumes"]}["config"]["configMap"]


def policies(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}


def selects(selector: dict[str, Any], pod: dict[str, Any]) -> bool:
    labels = pod["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_network_policies_let_only_the_gateway_reach_serving_and_prometheus_the_metrics() -> None:
    objects = render_system(production(**CANARY), KEDA_POLICY)
    pods = {
        o["metadata"]["name"]: o["spec"]["template"] for o in objects if o["kind"] == "Deployment"
    }
    spec = policies(objects)
    # Every pod of the system is under the default-deny of ingress.
    deny = spec["home-feed-default-deny"]
    assert deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    assert all(selects(deny["podSelector"], pod) for pod in pods.values())

    serving = spec["home-feed-serving"]
    assert {n for n, p in pods.items() if selects(serving["podSelector"], p)} == {
        "home-feed-serving",
        "home-feed-serving-canary",
    }
    inference, metrics = serving["ingress"]
    assert inference["ports"] == [{"protocol": "TCP", "port": 8080}]
    (peer,) = inference["from"]
    assert {n for n, p in pods.items() if selects(peer["podSelector"], p)} == {"home-feed-gateway"}
    assert "namespaceSelector" not in peer  # this namespace's gateway only
    assert metrics == {"ports": [{"protocol": "TCP", "port": "metrics"}]}  # any scraper
    # No rule opens the management port (it listens on loopback anyway).
    assert all(p["port"] != 8081 for rule in serving["ingress"] for p in rule["ports"])

    features = spec["home-feed-features"]
    assert features["ingress"] == [{"ports": [{"protocol": "TCP", "port": 9090}]}]
    assert {n for n, p in pods.items() if selects(features["podSelector"], p)} == {
        "home-feed-features"
    }


def test_the_gateway_may_not_reach_redis_and_serves_its_port_to_anyone() -> None:
    """Of the system's pods only serving and the feature job reach Redis: the gateway's
    egress is limited to DNS, serving, the broker and the API server."""
    system = production(**CANARY)
    gateway = policies(render_system(system, KEDA_POLICY))["home-feed-gateway"]
    assert gateway["policyTypes"] == ["Ingress", "Egress"]
    assert gateway["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8000}]}]
    allowed = {(p["protocol"], p["port"]) for rule in gateway["egress"] for p in rule["ports"]}
    broker = urlparse(system.spec.events.service_url).port or 6650
    assert allowed == {
        ("UDP", 53),
        ("TCP", 53),
        ("TCP", 8080),
        ("TCP", broker),
        ("TCP", 443),
        ("TCP", 6443),
    }
    redis_port = urlparse(system.spec.features.store.url).port or 6379
    assert ("TCP", redis_port) not in allowed
    (to_serving,) = [r for r in gateway["egress"] if "to" in r]
    assert to_serving["ports"] == [{"protocol": "TCP", "port": 8080}]


def test_prometheus_namespace_narrows_who_may_scrape() -> None:
    options = RenderOptions(prometheus_namespace="monitoring")
    spec = policies(render_system(quickstart(), HPA_POLICY, options))
    peer = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert spec["quickstart-serving"]["ingress"][1]["from"] == peer
    assert spec["quickstart-features"]["ingress"][0]["from"] == peer
    for policy in spec.values():
        kubernetes_validate.validate(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "x"},
                "spec": policy,
            },
            K8S_VERSION,
            strict=True,
        )


def test_a_cluster_store_reaches_the_feature_job_and_serving_as_its_mode() -> None:
    doc = copy.deepcopy(load("quickstart.yaml")[0])
    doc["spec"].setdefault("features", {})["store"] = {
        "url": "redis://redis-cluster:6379",
        "mode": "cluster",
    }
    objects = render_system(RecommenderSystem.model_validate(doc), HPA_POLICY)
    for name, container in (("quickstart-features", "features"), ("quickstart-serving", None)):
        pod = named(objects, "Deployment", name)["spec"]["template"]["spec"]
        found = [c for c in pod["containers"] if container is None or c["name"] == container]
        env = {e["name"]: e.get("value") for c in found for e in c.get("env", [])}
        assert env["RECSYS_REDIS_URL"] == "redis://redis-cluster:6379", name
        assert env["RECSYS_REDIS_MODE"] == "cluster", name
    default = render_system(quickstart(), HPA_POLICY)
    features = named(default, "Deployment", "quickstart-features")["spec"]["template"]["spec"]
    assert {"name": "RECSYS_REDIS_MODE", "value": "single"} in features["containers"][0]["env"]
