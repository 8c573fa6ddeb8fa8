"""The routing from its ConfigMap, watched through the Kubernetes API.

A real gateway (real HTTP on 127.0.0.1) watches a ConfigMap in the Kubernetes API
emulator (kmock, real HTTP too); the tests write the ConfigMap through the API as the
operator does and look at what the gateway answers and counts.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import certifi
import kubernetes
import pytest
import requests
from gateway_testing import metric_value, routing_document, wait_until
from kubemock.fixtures import KubeHandle
from serving_stub import ServingStub
from typer.testing import CliRunner

from gateway.app import GatewaySettings
from gateway.cli import gateway_app
from gateway.routing import ReloadResult, RoutingError
from gateway.routing_configmap import ConfigMapRef, ConfigMapRoutingWatcher, KubeApi
from gateway.server import ADDRESS_ENV, GatewayThread
from recsys_operator.launchers.process import ManagedProcess, free_port

NAMESPACE, NAME = "default", "recs-gateway"
COLLECTION = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
# What a rollout promises: every replica follows a weight change or a rollback within 5 s.
FOLLOW_WITHIN_S = 5.0
USERS = [f"user-{n}" for n in range(20)]


class RoutingConfigMap:
    """The gateway's ConfigMap in the emulated cluster, written through the API."""

    def __init__(self, kube: KubeHandle) -> None:
        self.core = kubernetes.client.CoreV1Api(kube.api_client)

    def create(self, routing: dict[str, Any] | str) -> None:
        body = {"metadata": {"name": NAME}, "data": {"routing.json": _text(routing)}}
        self.core.create_namespaced_config_map(NAMESPACE, body)

    def write(self, routing: dict[str, Any] | str) -> None:
        self.core.patch_namespaced_config_map(
            NAME, NAMESPACE, {"data": {"routing.json": _text(routing)}}
        )

    def delete(self) -> None:
        self.core.delete_namespaced_config_map(NAME, NAMESPACE)


def _text(routing: dict[str, Any] | str) -> str:
    return routing if isinstance(routing, str) else json.dumps(routing, indent=2)


@pytest.fixture
def configmap(kube: KubeHandle) -> RoutingConfigMap:
    return RoutingConfigMap(kube)


@pytest.fixture
def watching_gateway(kube: KubeHandle) -> Iterator[Callable[[], GatewayThread]]:
    """`watching_gateway()`: a started gateway whose routing is the ConfigMap, returned
    once its watch is live; stopped after the test (before the API emulator)."""
    started: list[GatewayThread] = []

    def start() -> GatewayThread:
        settings = GatewaySettings(
            routing_configmap=ConfigMapRef(NAMESPACE, NAME), kubeconfig=kube.kubeconfig
        )
        started.append(GatewayThread(settings).start())
        # The emulator replays no deletions to a watch that starts late, and a test's
        # injected failure is for the next request, not the gateway's first watch.
        wait_until(lambda: kube.emulator.open_watches == len(started))
        return started[-1]

    yield start
    for gateway in started:
        gateway.stop()


def variants(http: requests.Session, gateway: GatewayThread) -> set[str]:
    answers = [
        http.post(f"{gateway.url}/v1/recommend", json={"user_id": u, "k": 1}, timeout=10)
        for u in USERS
    ]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return {a.json()["variant"] for a in answers}


def reloads(http: requests.Session, gateway: GatewayThread, result: ReloadResult) -> float:
    text = http.get(f"{gateway.url}/metrics", timeout=10).text
    return metric_value(text, "recsys_gateway_routing_reloads_total", result=result.value)


def watch_requests(kube: KubeHandle, mark: int) -> list[Any]:
    return [
        r
        for r in kube.emulator.requests_since(mark, method="GET", path=COLLECTION)
        if r.params.get("watch") == "true"
    ]


def list_requests(kube: KubeHandle, mark: int) -> list[Any]:
    return [
        r
        for r in kube.emulator.requests_since(mark, method="GET", path=COLLECTION)
        if "watch" not in r.params
    ]


def watching_again(kube: KubeHandle, mark: int, watches: int = 1) -> bool:
    """The gateway has made `watches` watch requests since `mark`, the last one live."""
    return len(watch_requests(kube, mark)) >= watches and kube.emulator.open_watches == 1


def test_a_weight_change_and_a_rollback_reach_the_gateway_within_5_s(
    serving: ServingStub,
    configmap: RoutingConfigMap,
    watching_gateway: Callable[[], GatewayThread],
    http: requests.Session,
) -> None:
    configmap.create(routing_document(serving, canary="2", weight=0))
    gateway = watching_gateway()
    assert variants(http, gateway) == {"stable"}

    configmap.write(routing_document(serving, canary="2", weight=100))
    written = time.monotonic()
    wait_until(lambda: variants(http, gateway) == {"canary"}, timeout=FOLLOW_WITHIN_S)
    weight_change_s = time.monotonic() - written

    configmap.write(routing_document(serving))  # rollback: no canary
    written = time.monotonic()
    wait_until(lambda: variants(http, gateway) == {"stable"}, timeout=FOLLOW_WITHIN_S)
    rollback_s = time.monotonic() - written
    health = http.get(f"{gateway.url}/healthz", timeout=10).json()
    assert health["canary_version"] is None and health["canary_weight"] == 0
    assert max(weight_change_s, rollback_s) < FOLLOW_WITHIN_S
    assert reloads(http, gateway, ReloadResult.OK) == 2


def test_it_lists_and_watches_only_its_own_configmap(
    serving: ServingStub,
    configmap: RoutingConfigMap,
    watching_gateway: Callable[[], GatewayThread],
    kube: KubeHandle,
    http: requests.Session,
) -> None:
    # A Role limited by resourceNames allows list and watch only with this field selector.
    mark = kube.emulator.mark()
    configmap.create(routing_document(serving, canary="2", weight=10))
    gateway = watching_gateway()
    wait_until(lambda: watch_requests(kube, mark))
    for request in list_requests(kube, mark) + watch_requests(kube, mark):
        assert request.params["fieldSelector"] == f"metadata.name={NAME}"
    assert watch_requests(kube, mark)[0].params["resourceVersion"]

    # Another ConfigMap in the namespace changing is none of the gateway's business.
    other = {"metadata": {"name": "other"}, "data": {"routing.json": "{not a routing"}}
    configmap.core.create_namespaced_config_map(NAMESPACE, other)
    configmap.write(routing_document(serving, canary="2", weight=20))
    wait_until(lambda: gateway.gateway.routing.current.canary_weight == 20)
    assert reloads(http, gateway, ReloadResult.INVALID) == 0
    assert reloads(http, gateway, ReloadResult.OK) == 1


def test_an_invalid_routing_keeps_the_last_good_one_and_is_counted(
    serving: ServingStub,
    configmap: RoutingConfigMap,
    watching_gateway: Callable[[], GatewayThread],
    http: requests.Session,
) -> None:
    configmap.create(routing_document(serving, canary="2", weight=100))
    gateway = watching_gateway()

    configmap.write('{"system": "shop.recs", "stable": ')  # not JSON
    wait_until(lambda: reloads(http, gateway, ReloadResult.INVALID) == 1)
    assert variants(http, gateway) == {"canary"}
    broken = routing_document(serving, canary="2", weight=100) | {"canaryWeight": 101}
    configmap.write(broken)  # JSON, but not a valid routing
    wait_until(lambda: reloads(http, gateway, ReloadResult.INVALID) == 2)
    assert variants(http, gateway) == {"canary"}

    configmap.write(routing_document(serving, canary="2", weight=0))
    wait_until(lambda: variants(http, gateway) == {"stable"}, timeout=FOLLOW_WITHIN_S)
    assert reloads(http, gateway, ReloadResult.OK) == 1


def test_a_deleted_configmap_keeps_the_gateway_serving(
    serving: ServingStub,
    configmap: RoutingConfigMap,
    watching_gateway: Callable[[], GatewayThread],
    http: requests.Session,
) -> None:
    configmap.create(routing_document(serving, canary="2", weight=100))
    gateway = watching_gateway()

    configmap.delete()
    wait_until(lambda: reloads(http, gateway, ReloadResult.UNREADABLE) == 1)
    assert variants(http, gateway) == {"canary"}

    # The operator puts it back (it watches its children); the gateway follows.
    configmap.create(routing_document(serving, canary="2", weight=0))
    wait_until(lambda: variants(http, gateway) == {"stable"}, timeout=FOLLOW_WITHIN_S)
    assert reloads(http, gateway, ReloadResult.UNREADABLE) == 1


def test_the_watch_resumes_where_it_was_when_the_api_server_ends_it(
    serving: ServingStub,
    configmap: RoutingConfigMap,
    watching_gateway: Callable[[], GatewayThread],
    kube: KubeHandle,
    http: requests.Session,
) -> None:
    configmap.create(routing_document(serving, canary="2", weight=0))
    gateway = watching_gateway()
    configmap.write(routing_document(serving, canary="2", weight=30))
    wait_until(lambda: gateway.gateway.routing.current.canary_weight == 30)
    version = configmap.core.read_namespaced_config_map(NAME, NAMESPACE).metadata.resource_version

    for _ in range(3):  # the API server restarts (or times the watch out), three times
        mark = kube.emulator.mark()
        kube.end_watches()
        wait_until(lambda mark=mark: watching_again(kube, mark))
        (resumed,) = watch_requests(kube, mark)
        assert resumed.params["resourceVersion"] == version  # resumed, not started over
        assert not list_requests(kube, mark)

    configmap.write(routing_document(serving, canary="2", weight=100))
    wait_until(lambda: variants(http, gateway) == {"canary"}, timeout=FOLLOW_WITHIN_S)
    assert reloads(http, gateway, ReloadResult.OK) == 2  # nothing replayed twice
    assert reloads(http, gateway, ReloadResult.UNREADABLE) == 0


GONE_STATUS = {
    "apiVersion": "v1",
    "kind": "Status",
    "status": "Failure",
    "code": 410,
    "reason": "Expired",
    "message": "too old resource version",
}


@pytest.mark.parametrize(
    ("status", "body"),
    [(410, GONE_STATUS), (200, {"type": "ERROR", "object": GONE_STATUS})],
    ids=["410-response", "410-error-event"],
)
def test_410_gone_makes_it_list_again(
    status: int,
    body: dict[str, Any],
    serving: ServingStub,
    configmap: RoutingConfigMap,
    watching_gateway: Callable[[], GatewayThread],
    kube: KubeHandle,
    http: requests.Session,
) -> None:
    configmap.create(routing_document(serving, canary="2", weight=0))
    gateway = watching_gateway()
    mark = kube.emulator.mark()
    # The next watch is told its version is too old (as the real server answers, either
    # as the response's status or as an ERROR event in the stream).
    kube.emulator.fail_next(1, method="GET", path=COLLECTION, status=status, body=body)
    kube.end_watches()
    wait_until(lambda: watching_again(kube, mark, watches=2))
    assert len(list_requests(kube, mark)) == 1

    configmap.write(routing_document(serving, canary="2", weight=100))
    wait_until(lambda: variants(http, gateway) == {"canary"}, timeout=FOLLOW_WITHIN_S)
    assert reloads(http, gateway, ReloadResult.UNREADABLE) == 0  # routine, not an outage


def test_api_errors_are_counted_once_and_the_watch_recovers(
    serving: ServingStub,
    configmap: RoutingConfigMap,
    watching_gateway: Callable[[], GatewayThread],
    kube: KubeHandle,
    http: requests.Session,
) -> None:
    configmap.create(routing_document(serving, canary="2", weight=100))
    gateway = watching_gateway()
    mark = kube.emulator.mark()
    kube.emulator.fail_next(3, method="GET", path=COLLECTION, status=503)
    kube.end_watches()
    # Three failed attempts (the watch, then lists with a backoff), then a list that works.
    wait_until(lambda: len(list_requests(kube, mark)) >= 3 and watching_again(kube, mark))
    assert variants(http, gateway) == {"canary"}  # served meanwhile

    configmap.write(routing_document(serving, canary="2", weight=0))
    wait_until(lambda: variants(http, gateway) == {"stable"}, timeout=FOLLOW_WITHIN_S)
    assert reloads(http, gateway, ReloadResult.UNREADABLE) == 1  # one outage, counted once


def test_a_gateway_without_its_configmap_does_not_start(kube: KubeHandle) -> None:
    api = KubeApi.from_environment(kube.kubeconfig)
    with pytest.raises(RoutingError, match=f"ConfigMap {NAMESPACE}/{NAME} not found"):
        ConfigMapRoutingWatcher(ConfigMapRef(NAMESPACE, NAME), api)

    # The CLI finds the API through $KUBECONFIG (the fixture sets it) and says why.
    result = CliRunner().invoke(gateway_app, ["run", "--routing-configmap", f"default/{NAME}"])
    assert result.exit_code == 2
    assert f"ConfigMap default/{NAME} not found" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of --routing FILE and --routing-configmap"),
        (
            ["--routing", "r.json", "--routing-configmap", "default/x"],
            "exactly one of --routing FILE and --routing-configmap",
        ),
        (["--routing-configmap", "recs-gateway"], "NAMESPACE/NAME"),
    ],
    ids=["neither", "both", "no-namespace"],
)
def test_the_cli_wants_one_routing_source(args: list[str], message: str) -> None:
    result = CliRunner().invoke(gateway_app, ["run", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_the_gateway_process_follows_its_configmap(
    serving: ServingStub,
    configmap: RoutingConfigMap,
    kube: KubeHandle,
    tmp_path: Path,
    http: requests.Session,
) -> None:
    """As the rendered Deployment runs it: `gateway run --routing-configmap NS/NAME`."""
    configmap.create(routing_document(serving, canary="2", weight=0))
    port = free_port()
    process = ManagedProcess(
        "gateway",
        [sys.executable, "-m", "gateway", "run", "--routing-configmap", f"{NAMESPACE}/{NAME}"],
        tmp_path / "gateway.log",
        port,
        env={ADDRESS_ENV: f"127.0.0.1:{port}", "KUBECONFIG": str(kube.kubeconfig)},
    )
    process.start(ready_timeout=30)
    try:
        url = f"http://127.0.0.1:{port}"
        configmap.write(routing_document(serving, canary="2", weight=100))
        wait_until(
            lambda: http.get(f"{url}/healthz", timeout=10).json()["canary_weight"] == 100,
            timeout=FOLLOW_WITHIN_S,
        )
    finally:
        assert process.popen is not None
        process.popen.send_signal(signal.SIGTERM)
        assert process.popen.wait(timeout=30) == 0
    assert f"ConfigMap {NAMESPACE}/{NAME}" in process.log_path.read_text()


def test_in_a_pod_the_service_account_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("token-of-the-gateway")
    monkeypatch.setattr(kubernetes.config.incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(
        kubernetes.config.incluster_config, "SERVICE_CERT_FILENAME", certifi.where()
    )
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "not-used"))  # the pod's account wins

    api = KubeApi.from_environment()
    assert api.url == "https://10.96.0.1:443"
    assert api.headers()["authorization"] == "bearer token-of-the-gateway"
    assert api.ssl.verify_mode.name == "CERT_REQUIRED"


def test_without_a_pod_or_a_kubeconfig_the_error_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    with pytest.raises(RoutingError, match="cannot find the Kubernetes API"):
        KubeApi.from_environment()
