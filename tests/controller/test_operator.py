"""The operator end to end against the Kubernetes API (kmock over real HTTP) and Pulsar's
admin API (kmock answering as Pulsar documents it).

The emulated API server runs no controllers, so tests play the Deployment controller
where readiness matters (`mark_deployments_available`), as a kubelet would report.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import itertools
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubemock.accounting import describe
from kubemock.fixtures import KubeHandle, PulsarAdminHandle, wait_for

from gateway.app import GatewaySettings
from gateway.routing_configmap import ConfigMapRef
from gateway.server import GatewayThread
from recsys_operator.api.status import AnalysisDecision, AnalysisResult, CanaryStatus
from recsys_operator.controller import handlers, metrics

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION = "recsys.dev", "v1alpha1"
HANDLERS = "recsys_operator.controller.handlers"
pytestmark = pytest.mark.xdist_group(
    "operator"
)  # one Kopf registry per process; keep them together


def quickstart(
    pulsar: PulsarAdminHandle, name: str = "shop", **spec_changes: Any
) -> dict[str, Any]:
    doc = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text()))
    doc["metadata"]["name"] = name
    doc["spec"]["events"]["adminUrl"] = pulsar.url
    doc["spec"]["rollout"]["interval"] = "1s"
    for path, value in spec_changes.items():
        node = doc["spec"]
        *parents, leaf = path.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return doc


def policy() -> dict[str, Any]:
    return next(yaml.safe_load_all((ROOT / "examples" / "scaling-policy.yaml").read_text()))


class Cluster:
    """Typed access to the emulated cluster through the official kubernetes client."""

    def __init__(self, kube: KubeHandle):
        self.kube = kube
        self.custom = kubernetes.client.CustomObjectsApi(kube.api_client)
        self.apps = kubernetes.client.AppsV1Api(kube.api_client)
        self.core = kubernetes.client.CoreV1Api(kube.api_client)

    def create(self, plural: str, body: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, "default", plural, body)

    def system(self, name: str = "shop") -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, "default", "recommendersystems", name
        )

    def patch_system(self, patch: dict[str, Any], name: str = "shop") -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, "default", "recommendersystems", name, patch
        )

    def condition(self, type_: str, name: str = "shop") -> dict[str, Any] | None:
        conditions = (self.system(name).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == type_), None)

    def deployments(self) -> dict[str, Any]:
        return {d.metadata.name: d for d in self.apps.list_namespaced_deployment("default").items}

    def mark_deployments_available(self) -> None:
        """Do what the Deployment controller and kubelets would: report every replica ready."""
        for deployment in self.apps.list_namespaced_deployment("default").items:
            replicas = deployment.spec.replicas or 1
            status = {
                "observedGeneration": deployment.metadata.generation or 0,
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
            }
            try:
                self.apps.patch_namespaced_deployment_status(
                    deployment.metadata.name, "default", {"status": status}
                )
            except kubernetes.client.exceptions.ApiException as exc:
                if exc.status != 404:  # 404: pruned since the list (a rolled-back canary)
                    raise


@pytest.fixture
def cluster(kube: KubeHandle) -> Cluster:
    return Cluster(kube)


@pytest.fixture
def operator(run_operator: Callable[..., Any], kube: KubeHandle) -> Iterator[Any]:
    handlers.STATE.analysis_source = None
    handlers.STATE.shadow_source = None
    yield run_operator(HANDLERS)
    handlers.STATE.analysis_source = None


def ready(cluster: Cluster, name: str = "shop") -> dict[str, Any]:
    """Wait for Ready=True, playing the Deployment controller meanwhile."""

    def check() -> dict[str, Any] | None:
        cluster.mark_deployments_available()
        cond = cluster.condition("Ready", name)
        return cond if cond and cond["status"] == "True" else None

    return wait_for(check, timeout=60)


def test_create_makes_topics_children_and_ready(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    cluster.create("scalingpolicies", policy())
    cluster.create("recommendersystems", quickstart(pulsar_admin))

    wait_for(
        lambda: {"shop-serving", "shop-gateway", "shop-features"} <= cluster.deployments().keys()
    )
    cond = ready(cluster)
    system = cluster.system()
    assert cond["reason"] == "AllComponentsReady"
    assert (
        cond["observedGeneration"]
        == system["metadata"]["generation"]
        == system["status"]["observedGeneration"]
    )
    assert system["status"]["stableVersion"] == "1"
    types = {c["type"]: c["status"] for c in system["status"]["conditions"]}
    assert types["TopicsReady"] == types["FeaturesReady"] == types["ServingReady"] == "True"

    topics = pulsar_admin.emulator.topics
    base = "persistent://recsys/default-shop"
    assert topics[f"{base}/interactions"].partitions == 2
    assert topics[f"{base}/dead-letter"].partitions == 1
    assert topics[f"{base}/interactions"].retention == {
        "retentionTimeInMinutes": 1440,
        "retentionSizeInMB": 1024,
    }
    assert (
        topics[f"{base}/interactions"].backlog_quotas["destination_storage"]["policy"]
        == "producer_request_hold"
    )

    # Children are owned by the system and labelled; autoscaling came from the policy.
    serving = cluster.deployments()["shop-serving"]
    assert serving.metadata.owner_references[0].uid == system["metadata"]["uid"]
    hpas = kubernetes.client.AutoscalingV2Api(
        cluster.kube.api_client
    ).list_namespaced_horizontal_pod_autoscaler("default")
    assert {h.metadata.name: h.spec.max_replicas for h in hpas.items}["shop-serving"] == 8
    # The gateway pods' identity and their right to watch the routing ConfigMap.
    rbac = kubernetes.client.RbacAuthorizationV1Api(cluster.kube.api_client)
    gateway_children = [
        cluster.core.read_namespaced_service_account("shop-gateway", "default"),
        rbac.read_namespaced_role("shop-gateway", "default"),
        rbac.read_namespaced_role_binding("shop-gateway", "default"),
    ]
    for child in gateway_children:
        assert child.metadata.owner_references[0].uid == system["metadata"]["uid"]
    assert gateway_children[1].rules[0].resource_names == ["shop-gateway"]
    # Kopf's own bookkeeping is in status, never in annotations.
    assert not any(
        k.startswith("kopf.zalando.org") for k in (system["metadata"].get("annotations") or {})
    )


def test_an_unchanged_system_is_reconciled_without_writes(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    cluster.create("scalingpolicies", policy())
    cluster.create("recommendersystems", quickstart(pulsar_admin))
    ready(cluster)
    resyncs = metrics.RECONCILES.labels(trigger="resync")

    # Let any in-flight reconcile settle, then count what the next two resyncs write.
    before = resyncs._value.get()
    wait_for(lambda: resyncs._value.get() >= before + 1, timeout=15)
    kube_mark, pulsar_mark = cluster.kube.emulator.mark(), pulsar_admin.emulator.mark()
    before = resyncs._value.get()
    wait_for(lambda: resyncs._value.get() >= before + 2, timeout=15)

    writes = cluster.kube.emulator.writes_since(kube_mark, exclude=("events",))
    assert not writes, describe(writes)
    pulsar_writes = [
        r for r in pulsar_admin.emulator.requests_since(pulsar_mark) if r.method.value != "GET"
    ]
    assert not pulsar_writes, describe(pulsar_writes)
    assert cluster.kube.emulator.requests_since(kube_mark, method="GET"), "the resyncs did read"


def test_spec_change_patches_the_children(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    cluster.create("scalingpolicies", policy())
    cluster.create("recommendersystems", quickstart(pulsar_admin))
    ready(cluster)
    before = cluster.deployments()["shop-serving"].spec.template.metadata.annotations[
        "recsys.dev/config-hash"
    ]

    cluster.patch_system(
        {"spec": {"serving": {"batching": {"maxBatchSize": 48}}, "features": {"lastN": 20}}}
    )

    def patched() -> bool:
        config = cluster.core.read_namespaced_config_map("shop-serving", "default").data[
            "config.properties"
        ]
        env = {
            e.name: e.value
            for e in cluster.deployments()["shop-features"].spec.template.spec.containers[0].env
        }
        return '"batchSize":48' in config and env["RECSYS_LAST_N"] == "20"

    wait_for(patched)
    after = cluster.deployments()["shop-serving"].spec.template.metadata.annotations[
        "recsys.dev/config-hash"
    ]
    assert after != before  # the serving pods roll to pick up the new config
    generation = cluster.system()["metadata"]["generation"]
    wait_for(lambda: cluster.condition("Ready")["observedGeneration"] == generation)


def test_hand_edited_or_deleted_children_are_restored(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    cluster.create("scalingpolicies", policy())
    cluster.create("recommendersystems", quickstart(pulsar_admin))
    ready(cluster)
    image = cluster.deployments()["shop-gateway"].spec.template.spec.containers[0].image

    cluster.apps.patch_namespaced_deployment(
        "shop-gateway",
        "default",
        {
            "spec": {
                "template": {
                    "spec": {"containers": [{"name": "gateway", "image": "evil/image:latest"}]}
                }
            }
        },
    )
    wait_for(
        lambda: (
            cluster.deployments()["shop-gateway"].spec.template.spec.containers[0].image == image
        )
    )

    cluster.core.delete_namespaced_config_map("shop-serving", "default")
    wait_for(
        lambda: (
            "shop-serving"
            in {c.metadata.name for c in cluster.core.list_namespaced_config_map("default").items}
        )
    )


def test_invalid_spec_is_a_false_condition_and_creates_nothing(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    cluster.create("scalingpolicies", policy())
    cluster.create("recommendersystems", quickstart(pulsar_admin, rollout__steps=[50, 20, 100]))

    cond = wait_for(lambda: cluster.condition("Ready"))
    assert (cond["status"], cond["reason"]) == ("False", "InvalidSpec")
    assert "spec.rollout.steps" in cond["message"]
    assert cluster.deployments() == {}
    assert cluster.core.list_namespaced_config_map("default").items == []
    assert pulsar_admin.emulator.topics == {}

    # Fixing the spec brings everything up.
    cluster.patch_system({"spec": {"rollout": {"steps": [20, 50, 100]}}})
    ready(cluster)


def test_missing_policy_waits_then_reconciles_when_it_appears(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    cluster.create("recommendersystems", quickstart(pulsar_admin))
    cond = wait_for(lambda: cluster.condition("Ready"))
    assert (cond["status"], cond["reason"]) == ("False", "ScalingPolicyNotFound")
    assert cluster.deployments() == {}

    cluster.create("scalingpolicies", policy())
    ready(cluster)
    conditions = cluster.custom.get_namespaced_custom_object(
        GROUP, VERSION, "default", "scalingpolicies", "default"
    )["status"]["conditions"]
    assert conditions[0]["type"] == "Ready" and conditions[0]["status"] == "True"


def test_a_system_exceeding_its_policy_is_refused(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    cluster.create("scalingpolicies", policy())
    cluster.create("recommendersystems", quickstart(pulsar_admin, scaling={"maxReplicas": 50}))
    cond = wait_for(lambda: cluster.condition("Ready"))
    assert (cond["status"], cond["reason"]) == ("False", "PolicyViolation")
    assert (
        "spec.scaling.maxReplicas" in cond["message"]
        and 'ScalingPolicy "default"' in cond["message"]
    )
    assert cluster.deployments() == {}


def test_pulsar_admin_errors_are_retried(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    pulsar_admin.emulator.fail_next(2, method="PUT", path="/admin/v2/persistent/*", status=500)
    cluster.create("scalingpolicies", policy())
    cluster.create("recommendersystems", quickstart(pulsar_admin))
    ready(cluster)
    creates = pulsar_admin.emulator.requests_since(0, method="PUT", path="/admin/v2/persistent/*")
    assert len(creates) == 3 + 2  # three topics, two of the attempts answered 500
    assert len(pulsar_admin.emulator.topics) == 3


def test_pulsar_auth_comes_from_the_secret(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    pulsar_admin.emulator.token = "s3cret"
    cluster.create("scalingpolicies", policy())
    doc = quickstart(pulsar_admin, events__authSecretRef={"name": "pulsar-token", "key": "token"})
    cluster.create("recommendersystems", doc)
    cond = wait_for(lambda: cluster.condition("TopicsReady"))
    assert (cond["status"], cond["reason"]) == ("False", "PulsarSecretNotFound")
    assert 'Secret "pulsar-token"' in cond["message"]

    def secret(token: bytes) -> dict[str, Any]:
        return {
            "metadata": {"name": "pulsar-token"},
            "data": {"token": base64.b64encode(token).decode()},
        }

    cluster.core.create_namespaced_secret("default", secret(b"wrong"))
    wait_for(lambda: cluster.condition("TopicsReady")["reason"] == "PulsarUnauthorized", timeout=30)
    cluster.core.patch_namespaced_secret("pulsar-token", "default", secret(b"s3cret"))
    wait_for(lambda: cluster.condition("TopicsReady")["status"] == "True", timeout=30)
    assert len(pulsar_admin.emulator.topics) == 3


def test_a_secret_the_operator_may_not_read_is_named_with_the_fix(
    cluster: Cluster, kube: KubeHandle, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    """Cluster-wide, Secrets are readable only in the chart's secretNamespaces: a 403 says so
    (and the system recovers once the grant exists)."""
    pulsar_admin.emulator.token = "s3cret"
    secret = {"metadata": {"name": "pulsar-token"}, "data": {"token": "czNjcmV0"}}
    cluster.core.create_namespaced_secret("default", secret)
    kube.emulator.fail_next(
        3,
        method="GET",
        path="/api/v1/namespaces/default/secrets/pulsar-token",
        status=403,
        body={
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "code": 403,
            "reason": "Forbidden",
            "message": 'secrets "pulsar-token" is forbidden',
        },
    )
    cluster.create("scalingpolicies", policy())
    doc = quickstart(pulsar_admin, events__authSecretRef={"name": "pulsar-token", "key": "token"})
    cluster.create("recommendersystems", doc)
    cond = wait_for(lambda: cluster.condition("TopicsReady"))
    assert (cond["status"], cond["reason"]) == ("False", "PulsarSecretNotFound")
    assert 'namespace "default" (forbidden)' in cond["message"]
    assert "secretNamespaces" in cond["message"]
    wait_for(lambda: cluster.condition("TopicsReady")["status"] == "True", timeout=60)


@pytest.mark.parametrize(("policy_name", "kept"), [("Delete", False), ("Keep", True)])
def test_delete_handles_topics_per_policy(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any, policy_name: str, kept: bool
) -> None:
    cluster.create("scalingpolicies", policy())
    cluster.create(
        "recommendersystems", quickstart(pulsar_admin, events__deletionPolicy=policy_name)
    )
    ready(cluster)
    assert cluster.system()["metadata"]["finalizers"]  # Kopf's, for the topic clean-up

    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, "default", "recommendersystems", "shop"
    )

    def gone() -> bool:
        try:
            cluster.system()
        except kubernetes.client.exceptions.ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone)
    assert bool(pulsar_admin.emulator.topics) is kept


def scripted_source(*decisions: AnalysisDecision) -> Callable[[dict[str, Any]], Any]:
    queue = list(decisions)

    def factory(body: dict[str, Any]) -> Any:
        async def analyse(canary: CanaryStatus, window: float) -> AnalysisResult:
            decision = queue.pop(0) if queue else AnalysisDecision.WAIT
            return AnalysisResult(
                time="2026-01-01T00:00:00Z", decision=decision, reason=f"scripted {decision.value}"
            )

        return analyse

    return factory


@contextlib.contextmanager
def gateway_watching(cluster: Cluster) -> Iterator[GatewayThread]:
    """A real gateway following the routing ConfigMap the operator writes."""
    settings = GatewaySettings(
        routing_configmap=ConfigMapRef("default", "shop-gateway"),
        kubeconfig=cluster.kube.kubeconfig,
    )
    with GatewayThread(settings) as gateway:
        yield gateway


def routing(cluster: Cluster) -> dict[str, Any]:
    import json

    return json.loads(
        cluster.core.read_namespaced_config_map("shop-gateway", "default").data["routing.json"]
    )


def test_version_change_rolls_out_and_survives_an_operator_restart(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, run_operator: Callable[..., Any]
) -> None:
    handlers.STATE.analysis_source = scripted_source(AnalysisDecision.PASS)
    first = run_operator(HANDLERS)
    with contextlib.ExitStack() as stack:
        stack.callback(setattr, handlers.STATE, "analysis_source", None)
        cluster.create("scalingpolicies", policy())
        cluster.create("recommendersystems", quickstart(pulsar_admin))
        ready(cluster)
        gateway = stack.enter_context(gateway_watching(cluster))
        cluster.patch_system(
            {
                "spec": {
                    "model": {"version": "2", "archiveUri": "http://models.default/retrieval-2.mar"}
                }
            }
        )

        # Step 0 (20%) passes its scripted analysis; step 1 (50%) then waits for more impressions.
        wait_for(
            lambda: (cluster.system()["status"].get("canary") or {}).get("weight") == 50, timeout=60
        )
        wait_for(
            lambda: routing(cluster)["canaryWeight"] == 50
        )  # the reconcile right after the tick
        # The gateway follows the ConfigMap within the 5 s a rollout relies on.
        wait_for(lambda: gateway.gateway.routing.current.canary_weight == 50, timeout=5)
        assert "shop-serving-canary" in cluster.deployments()
        first.stop()

        canary = cluster.system()["status"]["canary"]
        second = run_operator(HANDLERS)  # a fresh operator: the whole state is in status
        wait_for(
            lambda: (
                cluster.system()["status"]["canary"]["inconclusiveCount"]
                > canary["inconclusiveCount"]
            ),
            timeout=60,
        )
        resumed = cluster.system()["status"]["canary"]
        assert (resumed["step"], resumed["weight"], resumed["version"]) == (1, 50, "2")
        assert (
            routing(cluster)["canary"]["version"] == "2" and routing(cluster)["canaryWeight"] == 50
        )
        second.stop()


def test_a_failed_analysis_rolls_back_and_says_why(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, run_operator: Callable[..., Any]
) -> None:
    handlers.STATE.analysis_source = scripted_source(AnalysisDecision.FAIL)
    with contextlib.ExitStack() as stack:
        stack.callback(setattr, handlers.STATE, "analysis_source", None)
        run_operator(HANDLERS)
        cluster.create("scalingpolicies", policy())
        cluster.create("recommendersystems", quickstart(pulsar_admin))
        ready(cluster)
        gateway = stack.enter_context(gateway_watching(cluster))
        cluster.patch_system(
            {
                "spec": {
                    "model": {"version": "2", "archiveUri": "http://models.default/retrieval-2.mar"}
                }
            }
        )

        cond = wait_for(
            lambda: (c := cluster.condition("RolloutHealthy")) and c["status"] == "False" and c,
            timeout=60,
        )
        assert cond["reason"] == "RolledBack" and "scripted Fail" in cond["message"]
        status = cluster.system()["status"]
        assert status["stableVersion"] == "1" and "canary" not in status
        assert status["lastRollout"]["outcome"] == "RolledBack"
        wait_for(
            lambda: routing(cluster)["canaryWeight"] == 0 and routing(cluster)["canary"] is None
        )
        wait_for(lambda: gateway.gateway.routing.current.canary is None, timeout=5)
        events = cluster.core.list_namespaced_event("default").items
        assert any(e.reason == "RolledBack" and "scripted Fail" in e.message for e in events)
        # The finished canary's pods, Service and ConfigMap are removed, not left running.
        wait_for(lambda: "shop-serving-canary" not in cluster.deployments(), timeout=30)
        assert "shop-serving-canary" not in [
            s.metadata.name for s in cluster.core.list_namespaced_service("default").items
        ]
        assert "shop-serving-canary" not in [
            c.metadata.name for c in cluster.core.list_namespaced_config_map("default").items
        ]


class WebhookReceiver:
    """A webhook endpoint on 127.0.0.1 (in a thread): answers each path with a fixed status
    and message, and records every payload."""

    def __init__(self, answers: dict[str, tuple[int, str]]):
        import http.server
        import json
        import threading

        received: list[tuple[str, dict[str, Any]]] = []
        self.received = received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                received.append((self.path, json.loads(self.rfile.read(length))))
                status, message = answers[self.path]
                body = json.dumps({"message": message}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_version_2(cluster: Cluster) -> None:
    cluster.patch_system(
        {"spec": {"model": {"version": "2", "archiveUri": "http://models.default/retrieval-2.mar"}}}
    )


def test_a_failing_pre_rollout_webhook_rolls_back_with_its_message(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, run_operator: Callable[..., Any]
) -> None:
    receiver = WebhookReceiver({"/smoke": (500, "3 of 20 smoke queries returned no items")})
    handlers.STATE.analysis_source = scripted_source(AnalysisDecision.PASS)
    with contextlib.ExitStack() as stack:
        stack.callback(receiver.close)
        stack.callback(setattr, handlers.STATE, "analysis_source", None)
        run_operator(HANDLERS)
        cluster.create("scalingpolicies", policy())
        hooks = [
            {"name": "smoke", "type": "pre-rollout", "url": f"{receiver.url}/smoke", "retries": 1}
        ]
        cluster.create("recommendersystems", quickstart(pulsar_admin, rollout__webhooks=hooks))
        ready(cluster)
        start_version_2(cluster)

        def rolled_back() -> dict[str, Any] | None:
            cluster.mark_deployments_available()  # the canary's pod gets ready
            cond = cluster.condition("RolloutHealthy")
            return cond if cond and cond["reason"] == "WebhookFailed" else None

        cond = wait_for(rolled_back, timeout=60)
        assert cond["status"] == "False" and "3 of 20 smoke queries" in cond["message"]
        status = cluster.system()["status"]
        assert status["stableVersion"] == "1" and "canary" not in status
        assert "pre-rollout webhook smoke failed 2 time(s)" in status["lastRollout"]["reason"]
        # Called twice (retries: 1), before any traffic, with the documented payload.
        assert [path for path, _ in receiver.received] == ["/smoke", "/smoke"]
        payload = receiver.received[0][1]
        assert (payload["name"], payload["namespace"], payload["type"]) == (
            "shop",
            "default",
            "pre-rollout",
        )
        assert (payload["canaryVersion"], payload["canaryWeight"], payload["phase"]) == (
            "2",
            0,
            "PreRollout",
        )
        events = cluster.core.list_namespaced_event("default").items
        failures = [e for e in events if e.reason == "WebhookFailed"]
        assert failures and all(e.type == "Warning" for e in failures)
        assert any("1 of 2 tries" in e.message for e in failures)
        assert any(e.reason == "RolledBack" and "smoke" in e.message for e in events)


def test_confirmed_promotion_waits_for_a_person_then_scales_the_stable_up(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, run_operator: Callable[..., Any]
) -> None:
    receiver = WebhookReceiver({"/check": (200, "feature store migrated")})
    handlers.STATE.analysis_source = scripted_source(AnalysisDecision.PASS, AnalysisDecision.PASS)
    with contextlib.ExitStack() as stack:
        stack.callback(receiver.close)
        stack.callback(setattr, handlers.STATE, "analysis_source", None)
        run_operator(HANDLERS)
        cluster.create("scalingpolicies", policy())
        hooks = [{"name": "check", "type": "pre-promotion", "url": f"{receiver.url}/check"}]
        cluster.create(
            "recommendersystems",
            quickstart(pulsar_admin, rollout__webhooks=hooks, rollout__confirmPromotion=True),
        )
        ready(cluster)
        start_version_2(cluster)

        cond = wait_for(
            lambda: (
                (c := cluster.condition("RolloutHealthy"))
                and c["reason"] == "AwaitingPromotion"
                and c
            ),
            timeout=60,
        )
        assert (
            "waiting for a person" in cond["message"]
            or "until a person confirms" in cond["message"]
        )
        canary = cluster.system()["status"]["canary"]
        assert (canary["phase"], canary["weight"]) == ("AwaitingPromotion", 50)
        assert receiver.received == []  # the pre-promotion check waits for the person too
        cluster.mark_deployments_available()  # stable 1 ready (the HPA had it at 1), canary 1

        cluster.patch_system(
            {"metadata": {"annotations": {"recsys.dev/rollout-action": "promote"}}}
        )
        # The stable must carry the canary's share too: 2 replicas before the switch.
        scaling = wait_for(
            lambda: (
                (c := cluster.system()["status"].get("canary"))
                and c.get("stableReplicasTarget")
                and c
            ),
            timeout=60,
        )
        assert scaling["phase"] == "Promoting" and scaling["stableReplicasTarget"] == 2
        autoscaling = kubernetes.client.AutoscalingV2Api(cluster.kube.api_client)
        wait_for(
            lambda: (
                autoscaling.read_namespaced_horizontal_pod_autoscaler(
                    "shop-serving", "default"
                ).spec.min_replicas
                == 2
            ),
            timeout=30,
        )
        assert cluster.system()["status"]["stableVersion"] == "1"  # not before the pods are ready
        assert [path for path, _ in receiver.received] == ["/check"]
        assert receiver.received[0][1]["phase"] == "Promoting"

        # The HPA's work, as its controller would do it: the stable gets its second pod.
        cluster.apps.patch_namespaced_deployment_status(
            "shop-serving",
            "default",
            {"status": {"replicas": 2, "readyReplicas": 2, "availableReplicas": 2}},
        )
        wait_for(lambda: cluster.system()["status"]["stableVersion"] == "2", timeout=60)
        status = cluster.system()["status"]
        assert status["lastRollout"]["reason"] == "confirmed by a person"
        wait_for(lambda: routing(cluster)["canary"] is None, timeout=30)
        events = cluster.core.list_namespaced_event("default").items
        assert any(
            e.reason == "ScalingUpStable" and "1 of 2 replicas ready" in e.message for e in events
        )


def test_a_shadow_phase_mirrors_before_the_canary_gets_users(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, run_operator: Callable[..., Any]
) -> None:
    import threading

    from recsys_operator.api.status import ShadowResult

    seen_by_gateway = threading.Event()  # the judge waits until the test saw the mirroring

    def shadow_source(body: dict[str, Any]) -> Any:
        async def judge(canary: CanaryStatus, window: float) -> ShadowResult:
            decision = AnalysisDecision.PASS if seen_by_gateway.is_set() else AnalysisDecision.WAIT
            return ShadowResult(
                time="2026-01-01T00:00:00Z",
                decision=decision,
                reason=f"scripted shadow {decision.value}",
                compared=250,
            )

        return judge

    handlers.STATE.analysis_source = scripted_source()
    handlers.STATE.shadow_source = shadow_source
    with contextlib.ExitStack() as stack:
        stack.callback(setattr, handlers.STATE, "analysis_source", None)
        stack.callback(setattr, handlers.STATE, "shadow_source", None)
        run_operator(HANDLERS)
        cluster.create("scalingpolicies", policy())
        cluster.create(
            "recommendersystems",
            quickstart(
                pulsar_admin,
                rollout__shadow={"duration": "1s", "percent": 40},
                rollout__maxInconclusive=100,
            ),
        )
        ready(cluster)
        gateway = stack.enter_context(gateway_watching(cluster))
        start_version_2(cluster)

        wait_for(lambda: gateway.gateway.routing.current.shadow_percent == 40, timeout=30)
        current = gateway.gateway.routing.current
        assert current.canary is not None and current.canary.version == "2"
        assert current.effective_canary_weight == 0  # mirrored only: no user on the canary
        canary = cluster.system()["status"]["canary"]
        assert (canary["phase"], canary["weight"]) == ("Shadow", 0)
        seen_by_gateway.set()

        wait_for(
            lambda: (cluster.system()["status"].get("canary") or {}).get("weight") == 20,
            timeout=30,
        )
        wait_for(lambda: gateway.gateway.routing.current.shadow_percent == 0, timeout=30)
        assert gateway.gateway.routing.current.canary_weight == 20
        last = cluster.system()["status"]["canary"]["lastShadow"]
        assert (last["decision"], last["compared"]) == ("Pass", 250)
        events = cluster.core.list_namespaced_event("default").items
        assert any(e.reason == "ShadowPassed" for e in events)


def action_annotation(cluster: Cluster) -> str | None:
    return (cluster.system()["metadata"].get("annotations") or {}).get("recsys.dev/rollout-action")


def last_action(cluster: Cluster, action: str) -> dict[str, Any]:
    """Wait until the operator recorded `action` in status.lastAction, then return it."""
    return wait_for(
        lambda: (a := cluster.system()["status"].get("lastAction")) and a["action"] == action and a,
        timeout=30,
    )


def test_rollout_actions_are_validated_acted_on_and_acknowledged(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    """Each value of recsys.dev/rollout-action is acknowledged by an Event and
    status.lastAction before the annotation goes; an unknown one is refused."""
    handlers.STATE.analysis_source = scripted_source()  # every analysis waits
    cluster.create("scalingpolicies", policy())
    cluster.create("recommendersystems", quickstart(pulsar_admin))
    ready(cluster)

    def annotate(value: str, **spec: Any) -> None:
        patch: dict[str, Any] = {"metadata": {"annotations": {"recsys.dev/rollout-action": value}}}
        if spec:
            patch["spec"] = spec
        cluster.patch_system(patch)

    def events(reason: str) -> list[Any]:
        return [
            e for e in cluster.core.list_namespaced_event("default").items if e.reason == reason
        ]

    # Unknown: refused with a Warning, visible in status, then the annotation goes.
    annotate("rollback")
    refused = last_action(cluster, "rollback")
    assert refused["result"] == "Refused" and "abort, promote, pause, resume" in refused["message"]
    wait_for(lambda: [e.type for e in events("RolloutActionRefused")] == ["Warning"], timeout=10)
    wait_for(lambda: action_annotation(cluster) is None, timeout=10)

    # Abort set together with a version change: version 2 never starts.
    annotate("abort", model={"version": "2", "archiveUri": "http://models.default/retrieval-2.mar"})
    aborted = last_action(cluster, "abort")
    assert aborted["result"] == "Applied" and "before it started" in aborted["message"]
    status = cluster.system()["status"]
    assert status.get("canary") is None and status["stableVersion"] == "1"
    assert (status["lastRollout"]["version"], status["lastRollout"]["outcome"]) == ("2", "Aborted")
    wait_for(lambda: events("RolloutActionApplied"), timeout=10)
    assert not events("RolloutStarted")
    wait_for(lambda: action_annotation(cluster) is None, timeout=10)
    assert "shop-serving-canary" not in cluster.deployments()

    # Pause before a rollout: version 3 waits until resume.
    annotate("pause")
    assert last_action(cluster, "pause")["result"] == "Applied"
    wait_for(lambda: action_annotation(cluster) is None, timeout=10)
    cluster.patch_system(
        {"spec": {"model": {"version": "3", "archiveUri": "http://models.default/retrieval-3.mar"}}}
    )
    wait_for(
        lambda: "version 3 waits" in (cluster.condition("RolloutHealthy") or {}).get("message", "")
    )
    assert cluster.condition("RolloutHealthy")["reason"] == "Paused"
    assert cluster.system()["status"].get("canary") is None
    annotate("resume")
    assert last_action(cluster, "resume")["result"] == "Applied"
    wait_for(
        lambda: (cluster.system()["status"].get("canary") or {}).get("version") == "3",
        timeout=30,
    )
    wait_for(lambda: action_annotation(cluster) is None, timeout=10)


def test_a_retried_failure_backs_off_and_writes_no_unchanged_status(
    cluster: Cluster,
    pulsar_admin: PulsarAdminHandle,
    operator: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A missing Secret: the operator's own status is written once, not per retry, and
    Kopf's retries (each writes its progress to status) come further and further apart."""
    monkeypatch.setattr(handlers, "RETRY_FIRST_DELAY_S", 0.5)
    monkeypatch.setattr(handlers, "RETRY_MAX_DELAY_S", 4.0)
    cluster.create("scalingpolicies", policy())
    doc = quickstart(pulsar_admin, events__authSecretRef={"name": "pulsar-token", "key": "token"})
    mark = cluster.kube.emulator.mark()
    cluster.create("recommendersystems", doc)
    wait_for(
        lambda: (cluster.condition("TopicsReady") or {}).get("reason") == "PulsarSecretNotFound"
    )

    def status_patches() -> list[dict[str, Any]]:
        return [
            r.data["status"]
            for r in cluster.kube.emulator.writes_since(mark, resource="recommendersystems")
            if r.method.value == "PATCH" and isinstance(r.data, dict) and "status" in r.data
        ]

    def retry_times() -> list[float]:
        times = []
        for status in status_patches():
            progress = ((status.get("kopf") or {}).get("progress") or {}).get("reconcile_system")
            if progress and progress.get("delayed"):
                times.append(datetime.fromisoformat(progress["delayed"]).timestamp())
        return times

    wait_for(lambda: len(retry_times()) >= 5, timeout=30)
    times = retry_times()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 1 s, 2 s, 4 s (the cap), 4 s between retries, not 0.5 s each.
    assert gaps[0] > 0.7 and gaps[1] > 1.5 and gaps[2] > 3.0, gaps
    # After the first retry (by then the reconcile and the rollout timer have each written
    # theirs), every later retry found the same status and wrote none of it again.
    patches = status_patches()
    retries = [i for i, p in enumerate(patches) if "progress" in (p.get("kopf") or {})]
    ours_later = [p for p in patches[retries[1] :] if set(p) - {"kopf"}]
    assert ours_later == [], ours_later


def test_a_partition_decrease_is_refused_with_its_own_permanent_reason(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    cluster.create("scalingpolicies", policy())
    cluster.create("recommendersystems", quickstart(pulsar_admin))
    ready(cluster)
    cluster.patch_system({"spec": {"events": {"topics": {"interactions": {"partitions": 1}}}}})
    cond = wait_for(
        lambda: (
            (c := cluster.condition("TopicsReady"))
            and c["reason"] == "TopicPartitionsDecreased"
            and c
        ),
        timeout=30,
    )
    assert cond["status"] == "False" and "cannot reduce" in cond["message"]
    assert cluster.condition("Ready")["reason"] == "TopicPartitionsDecreased"
    topic = next(t for n, t in pulsar_admin.emulator.topics.items() if n.endswith("interactions"))
    assert topic.partitions == 2  # nothing was changed


# --- failures at deletion and while applying ------------------------------------------


def events_about(cluster: Cluster, name: str = "shop") -> list[dict[str, Any]]:
    items = cluster.kube.get("/api/v1/namespaces/default/events")["items"]
    return [e for e in items if e["involvedObject"]["name"] == name]


def system_gone(cluster: Cluster) -> bool:
    try:
        cluster.system()
    except kubernetes.client.exceptions.ApiException as exc:
        return exc.status == 404
    return False


def delete_system(cluster: Cluster) -> None:
    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, "default", "recommendersystems", "shop"
    )


def test_deletion_is_not_blocked_forever_when_the_pulsar_secret_went_first(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    """`kubectl delete -f dir/` (or deleting the namespace) removes the token's Secret with
    the system: the finalizer cannot delete the topics, says so, and lets the system go."""
    pulsar_admin.emulator.token = "s3cret"
    secret = {"metadata": {"name": "pulsar-token"}, "data": {"token": "czNjcmV0"}}
    cluster.core.create_namespaced_secret("default", secret)
    cluster.create("scalingpolicies", policy())
    doc = quickstart(
        pulsar_admin,
        events__authSecretRef={"name": "pulsar-token", "key": "token"},
        events__deletionPolicy="Delete",
    )
    cluster.create("recommendersystems", doc)
    ready(cluster)

    cluster.core.delete_namespaced_secret("pulsar-token", "default")
    delete_system(cluster)

    wait_for(lambda: system_gone(cluster), timeout=20)
    assert len(pulsar_admin.emulator.topics) == 3  # nothing could delete them
    warning = wait_for(
        lambda: [e for e in events_about(cluster) if e["reason"] == "TopicsLeftBehind"]
    )[0]
    assert warning["type"] == "Warning"
    assert 'Secret "pulsar-token"' in warning["message"]
    assert "persistent://recsys/default-shop/interactions" in warning["message"]


def test_deletion_gives_up_on_an_unreachable_pulsar_after_the_deadline(
    cluster: Cluster,
    pulsar_admin: PulsarAdminHandle,
    operator: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pulsar's admin API down for good: the finalizer retries until the deadline, then
    releases the system with a Warning naming the topics left in Pulsar."""
    monkeypatch.setattr(handlers, "TOPIC_DELETION_DEADLINE_S", 3.0)
    cluster.create("scalingpolicies", policy())
    cluster.create("recommendersystems", quickstart(pulsar_admin, events__deletionPolicy="Delete"))
    ready(cluster)
    pulsar_admin.emulator.fail_next(10_000, method="DELETE", status=503)

    delete_system(cluster)

    wait_for(lambda: system_gone(cluster), timeout=30)
    assert len(pulsar_admin.emulator.topics) == 3
    warning = wait_for(
        lambda: [e for e in events_about(cluster) if e["reason"] == "TopicsLeftBehind"]
    )[0]
    assert warning["type"] == "Warning" and "HTTP 503" in warning["message"]
    assert "persistent://recsys/default-shop/dead-letter" in warning["message"]


def test_a_child_the_api_server_refuses_is_a_condition_not_a_traceback(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    """An admission refusal (a ResourceQuota, a policy engine, an immutable field) of one
    child: the system says which child and why in its conditions, warns once, and
    recovers when the API server accepts it again."""
    refusal = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": 403,
        "reason": "Forbidden",
        "message": 'deployments.apps "shop-serving" is forbidden: exceeded quota: compute',
    }
    cluster.kube.emulator.fail_next(
        10_000,
        method="POST",
        path="/apis/apps/v1/namespaces/default/deployments",
        status=403,
        body=refusal,
    )
    cluster.create("scalingpolicies", policy())
    cluster.create("recommendersystems", quickstart(pulsar_admin))

    cond = wait_for(lambda: cluster.condition("ServingReady"), timeout=30)
    assert (cond["status"], cond["reason"]) == ("False", "ChildApplyFailed")
    assert "Deployment/" in cond["message"] and "exceeded quota" in cond["message"]
    ready_cond = cluster.condition("Ready")
    assert ready_cond is not None and ready_cond["status"] == "False"
    assert ready_cond["reason"] == "ChildApplyFailed"
    warnings = wait_for(
        lambda: [e for e in events_about(cluster) if e["reason"] == "ReconcileFailed"]
    )
    assert "exceeded quota" in warnings[0]["message"]

    cluster.kube.emulator.injected_faults.clear()  # the quota was raised
    ready(cluster)


def test_deletion_cleans_up_the_topics_of_a_spec_made_invalid_after_creation(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    """The CRD admits requests above limits (the models refuse it): a system edited that
    way after its topics were made still deletes them (deletionPolicy Delete)."""
    cluster.create("scalingpolicies", policy())
    cluster.create("recommendersystems", quickstart(pulsar_admin, events__deletionPolicy="Delete"))
    ready(cluster)
    assert len(pulsar_admin.emulator.topics) == 3
    cluster.patch_system(
        {
            "spec": {
                "serving": {
                    "resources": {"requests": {"memory": "4Gi"}, "limits": {"memory": "2Gi"}}
                }
            }
        }
    )
    wait_for(lambda: cluster.condition("Ready")["reason"] == "InvalidSpec", timeout=30)

    delete_system(cluster)

    wait_for(lambda: system_gone(cluster), timeout=20)
    assert pulsar_admin.emulator.topics == {}
    deleted = [e for e in events_about(cluster) if e["reason"] == "TopicsDeleted"]
    assert deleted and "interactions" in deleted[0]["message"], events_about(cluster)


def test_deleting_a_policy_rechecks_the_systems_using_it_at_once(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    """A deleted ScalingPolicy turns its systems' Ready to ScalingPolicyNotFound on its
    deletion, not at the next resync (a minute by default)."""
    cluster.create("scalingpolicies", policy())
    cluster.create("recommendersystems", quickstart(pulsar_admin))
    ready(cluster)
    by_policy = metrics.RECONCILES.labels(trigger="policy")
    before = by_policy._value.get()

    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, "default", "scalingpolicies", "default"
    )

    wait_for(lambda: by_policy._value.get() > before, timeout=10)
    cond = wait_for(
        lambda: (c := cluster.condition("Ready")) and c["reason"] == "ScalingPolicyNotFound" and c
    )
    assert cond["status"] == "False"


def test_a_policy_change_reaches_every_system_when_one_of_them_fails(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    """Two systems name the policy; reading the first fails (a transient API error). The
    second still gets the policy's change at once, not after Kopf's retry of the handler."""
    cluster.create("scalingpolicies", policy())
    for name in ("a-shop", "b-shop"):
        cluster.create("recommendersystems", quickstart(pulsar_admin, name=name))
    ready(cluster, "a-shop")
    ready(cluster, "b-shop")
    cluster.kube.emulator.fail_next(
        10_000,
        method="GET",
        path=f"/apis/{GROUP}/{VERSION}/namespaces/default/recommendersystems/a-shop",
        status=503,
    )
    by_policy = metrics.RECONCILES.labels(trigger="policy")
    before = by_policy._value.get()

    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", "scalingpolicies", "default",
        {"spec": {"gateway": {"maxReplicas": 5}}},
    )  # fmt: skip

    wait_for(lambda: by_policy._value.get() > before, timeout=10)  # b-shop, past a-shop
    cluster.kube.emulator.injected_faults.clear()


@pytest.mark.parametrize(
    "admin_url", ["http://pulsar-broker.pulsar:99999", "http://:8080", "http://[::1:8080"]
)
def test_an_admin_url_no_client_can_use_is_an_invalid_spec(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any, admin_url: str
) -> None:
    """The CRD's pattern admits these; the HTTP client cannot even build a request from
    them. A condition names the field (before: a traceback per retry, no status at all)."""
    cluster.create("scalingpolicies", policy())
    cluster.create("recommendersystems", quickstart(pulsar_admin, events__adminUrl=admin_url))
    cond = wait_for(lambda: cluster.condition("Ready"), timeout=20)
    assert (cond["status"], cond["reason"]) == ("False", "InvalidSpec")
    assert "spec.events.adminUrl" in cond["message"]


def test_deleting_one_of_two_systems_sharing_a_pulsar_namespace_keeps_the_topics(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, operator: Any
) -> None:
    """Two systems naming the same spec.events.namespace (a blue/green pair) share its
    topics: deleting one (deletionPolicy Delete) must not delete the other's live topics."""
    cluster.create("scalingpolicies", policy())
    for name in ("shop", "shop-green"):
        doc = quickstart(
            pulsar_admin, name=name, events__namespace="shop", events__deletionPolicy="Delete"
        )
        cluster.create("recommendersystems", doc)
    ready(cluster)
    ready(cluster, "shop-green")
    assert len(pulsar_admin.emulator.topics) == 3

    delete_system(cluster)

    wait_for(lambda: system_gone(cluster), timeout=20)
    assert len(pulsar_admin.emulator.topics) == 3
    kept = [e for e in events_about(cluster) if e["reason"] == "TopicsKept"]
    assert kept and "shop-green" in kept[0]["message"], events_about(cluster)


def test_a_new_archive_for_the_stable_version_is_what_the_stable_keeps_during_a_rollout(
    cluster: Cluster, pulsar_admin: PulsarAdminHandle, run_operator: Callable[..., Any]
) -> None:
    """The archive of version 1 moved (a new bucket) and the spec says so: the stable
    serves it, and still does once version 2's rollout starts (the stable is rendered
    from status.stableArchiveUri then, which must not keep the old location)."""
    import json

    moved = "http://models-new.default/retrieval/retrieval-1.mar"
    handlers.STATE.analysis_source = scripted_source()  # Wait: the canary holds its step
    with contextlib.ExitStack() as stack:
        stack.callback(setattr, handlers.STATE, "analysis_source", None)
        run_operator(HANDLERS)
        cluster.create("scalingpolicies", policy())
        cluster.create("recommendersystems", quickstart(pulsar_admin))
        ready(cluster)

        def stable_template() -> str:
            deployment = cluster.apps.read_namespaced_deployment("shop-serving", "default")
            return json.dumps(cluster.kube.api_client.sanitize_for_serialization(deployment.spec))

        cluster.patch_system({"spec": {"model": {"archiveUri": moved}}})
        wait_for(lambda: moved in stable_template(), timeout=30)
        wait_for(lambda: cluster.system()["status"].get("stableArchiveUri") == moved, timeout=10)

        start_version_2(cluster)
        wait_for(lambda: "shop-serving-canary" in cluster.deployments(), timeout=30)
        template = stable_template()
        assert moved in template and "models.default/retrieval/retrieval-1.mar" not in template
