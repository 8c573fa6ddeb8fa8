"""pytest fixtures: the Kubernetes and Pulsar admin emulators on 127.0.0.1, and Kopf in a thread.

Enable them with `pytest_plugins = ["kubemock.fixtures"]` in tests/conftest.py (tests/
is on sys.path there), or by importing the fixture names into a conftest.py.

- `kube`: a fresh Kubernetes API emulator per test, with the project's CRDs and the
  `default` namespace; a kubeconfig for it; the kubernetes client's default
  configuration and `$KUBECONFIG` point at it for the test (restored afterwards);
  `kube.end_watches()` ends every open watch stream, as an API server restart does.
- `pulsar_admin`: a fresh Pulsar admin API emulator per test (base URL without
  `/admin/v2`, as `spec.events.adminUrl` gives it).
- `run_operator`: starts Kopf in its own thread against `kube`; stopped after the test.

Each test gets its own servers on free ports, so tests run in parallel (pytest-xdist)
and never see each other's objects. Poll for effects with `wait_for`, never sleep.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import pytest
import yaml

from recsys_operator.tools import find_tool

from .emulator import KubeEmulator
from .operator_thread import OperatorThread
from .pulsar_admin import PulsarAdminEmulator
from .serving import ServerThread

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILES = sorted((REPO_ROOT / "crds").glob("*.yaml"))

T = TypeVar("T")


def minimal_crd(
    group: str, version: str, kind: str, plural: str, *, status: bool = True
) -> dict[str, Any]:
    """A namespaced CRD that accepts any spec: for third-party kinds the operator writes."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}} if status else {},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


KEDA_CRDS = (
    minimal_crd("keda.sh", "v1alpha1", "ScaledObject", "scaledobjects"),
    minimal_crd("keda.sh", "v1alpha1", "TriggerAuthentication", "triggerauthentications"),
)
RAY_CRDS = (minimal_crd("ray.io", "v1", "RayCronJob", "raycronjobs"),)
PROMETHEUS_OPERATOR_CRDS = (
    minimal_crd("monitoring.coreos.com", "v1", "ServiceMonitor", "servicemonitors", status=False),
    minimal_crd("monitoring.coreos.com", "v1", "PrometheusRule", "prometheusrules", status=False),
)


@dataclass
class KubeHandle:
    """What the `kube` fixture yields: the emulator (request log, faults) and ways to reach it."""

    emulator: KubeEmulator
    url: str  # http://127.0.0.1:PORT
    kubeconfig: Path
    api_client: kubernetes.client.ApiClient  # bound to this emulator, whatever the default
    server: ServerThread[KubeEmulator]

    def end_watches(self) -> None:
        """End every open watch stream now, as an API server does when it restarts."""
        self.server.call(KubeEmulator.end_watches)

    def install_crds(self, *crds: Mapping[str, Any]) -> None:
        """Create CRDs through the API; their resources are served from then on."""
        for crd in crds:
            self.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)

    def get(self, path: str) -> Any:
        """GET a path of the API as JSON (raises urllib's HTTPError on 4xx/5xx)."""
        return _json_request("GET", self.url + path)

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        """POST a JSON object to a path of the API (raises urllib's HTTPError on 4xx/5xx)."""
        return _json_request("POST", self.url + path, body)

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against the emulator (its discovery cache stays with the test)."""
        cache = self.kubeconfig.parent / "kubectl-cache"
        kubectl = find_tool("kubectl")  # .tools/bin first; fails (never skips) when missing
        command = [kubectl, f"--kubeconfig={self.kubeconfig}", f"--cache-dir={cache}", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result


@dataclass
class PulsarAdminHandle:
    """What the `pulsar_admin` fixture yields."""

    emulator: PulsarAdminEmulator  # state (tenants, namespaces, topics), auth, faults, log
    url: str  # http://127.0.0.1:PORT: the admin URL, without /admin/v2


@pytest.fixture(scope="session")
def project_crds() -> list[dict[str, Any]]:
    """The CRDs in crds/, read once per test process."""
    return [crd for path in CRD_FILES for crd in yaml.safe_load_all(path.read_text()) if crd]


@pytest.fixture
def kube(
    project_crds: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[KubeHandle]:
    """A Kubernetes API emulator with the project's CRDs and the `default` namespace."""
    server = ServerThread(
        KubeEmulator, name="kube-emulator", before_stop=KubeEmulator.end_watches
    ).start()
    previous_default = kubernetes.client.Configuration.get_default_copy()
    api_client = None
    try:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url)
        api_client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        handle = KubeHandle(server.handler, server.url, kubeconfig, api_client, server)
        handle.install_crds(*project_crds)
        handle.post("/api/v1/namespaces", {"kind": "Namespace", "metadata": {"name": "default"}})
        # Code under test uses the client's default configuration; subprocesses $KUBECONFIG.
        kubernetes.config.load_kube_config(config_file=str(kubeconfig))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        yield handle
    finally:
        kubernetes.client.Configuration.set_default(previous_default)
        if api_client is not None:
            api_client.close()
        server.stop()


@pytest.fixture
def pulsar_admin() -> Iterator[PulsarAdminHandle]:
    """A Pulsar admin API emulator holding what a fresh standalone broker holds."""
    server = ServerThread(PulsarAdminEmulator, name="pulsar-admin-emulator").start()
    try:
        yield PulsarAdminHandle(server.handler, server.url)
    finally:
        server.stop()


@pytest.fixture
def run_operator(kube: KubeHandle) -> Iterator[Callable[..., OperatorThread]]:
    """`run_operator(handlers=None, *, registry=None, namespaces=("default",), clusterwide=False,
    settings=None, memo=None)` starts Kopf against `kube` and returns the running
    OperatorThread; whatever is still running is stopped after the test."""
    operators: list[OperatorThread] = []

    def run(handlers: str | Path | None = None, **options: Any) -> OperatorThread:
        operators.append(OperatorThread(handlers, **options))
        return operators[-1].start()

    yield run
    for operator in reversed(operators):
        operator.stop()


def _json_request(method: str, url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method=method
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def write_kubeconfig(path: Path, server_url: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubemock", "cluster": {"server": server_url}}],
        "users": [{"name": "kubemock", "user": {}}],
        "contexts": [
            {
                "name": "kubemock",
                "context": {"cluster": "kubemock", "user": "kubemock", "namespace": "default"},
            }
        ],
        "current-context": "kubemock",
    }
    path.write_text(yaml.safe_dump(config))
    os.chmod(path, 0o600)  # kubectl warns about group/world-readable kubeconfigs
    return path


def wait_for(check: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll `check()` until it returns something truthy (returned) or fail after `timeout`.

    `check` may raise AssertionError while the condition does not hold yet.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
            problem = f"last result: {result!r}"
        except AssertionError as exc:
            problem = f"last failure: {exc}"
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s; {problem}")
        time.sleep(interval)
