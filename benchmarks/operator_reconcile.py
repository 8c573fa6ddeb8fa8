"""How the operator scales with the number of RecommenderSystems.

Against the Kubernetes API emulated by kmock over real HTTP (and kmock answering
as Pulsar's admin API), it creates N systems and reports:
- the time until all are Ready, and the floor: creating the same child objects
  directly through the API, with no operator (the ratio says what the operator adds);
- API requests per reconcile, and writes per system created (Events included; goal <= 25);
- write requests during a full resync of every unchanged system (must be 0), and Events
  per system per hour at steady state, for healthy and for blocked systems (goal 0; a
  blocked system references a ScalingPolicy that does not exist).

The emulated cluster has no Deployment controller; this script plays it, marking
each Deployment available as a kubelet would report.

    .venv/bin/python benchmarks/operator_reconcile.py --systems 200
    .venv/bin/python benchmarks/operator_reconcile.py --quick    # a smoke run: 2 systems
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the kmock-based emulators live with the tests

import kubernetes  # noqa: E402
import yaml  # noqa: E402

RESYNC_SECONDS = 20
QUICK_RESYNC_SECONDS = 5
os.environ["RECSYS_RESYNC_SECONDS"] = str(RESYNC_SECONDS)
os.environ["RECSYS_ROLLOUT_TICK_SECONDS"] = "3600"  # no rollouts here

from kubemock.emulator import KubeEmulator  # noqa: E402
from kubemock.fixtures import write_kubeconfig  # noqa: E402
from kubemock.pulsar_admin import PulsarAdminEmulator  # noqa: E402
from kubemock.serving import ServerThread  # noqa: E402

from recsys_operator.api.resources import RecommenderSystem, ScalingPolicy  # noqa: E402
from recsys_operator.launchers.process import ManagedProcess, free_port  # noqa: E402
from recsys_operator.render import render_system  # noqa: E402

GROUP, VERSION = "recsys.dev", "v1alpha1"


def system_doc(name: str, admin_url: str) -> dict[str, Any]:
    doc = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text()))
    doc["metadata"]["name"] = name
    doc["spec"]["events"]["adminUrl"] = admin_url
    return doc


def policy_doc() -> dict[str, Any]:
    return next(yaml.safe_load_all((ROOT / "examples" / "scaling-policy.yaml").read_text()))


class DeploymentController(threading.Thread):
    """Reports every Deployment available (what the real controller and kubelets do)."""

    def __init__(self, apps: kubernetes.client.AppsV1Api):
        super().__init__(daemon=True)
        self.apps, self.stopped, self.done = apps, threading.Event(), set[tuple[str, int]]()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            for d in self.apps.list_namespaced_deployment("default").items:
                assert d.metadata is not None and d.metadata.name is not None
                key = (d.metadata.name, d.metadata.generation or 0)
                if key in self.done:
                    continue
                n = d.spec.replicas or 1
                status = {
                    "observedGeneration": key[1],
                    "replicas": n,
                    "updatedReplicas": n,
                    "readyReplicas": n,
                    "availableReplicas": n,
                }
                self.apps.patch_namespaced_deployment_status(key[0], "default", {"status": status})
                self.done.add(key)


def operator_counter(url: str, name: str, **labels: str) -> float:
    """Sum of a counter on the operator's /metrics (only samples with the given labels)."""
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        ours = line.startswith((name + "{", name + " "))
        if ours and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def benchmark_write(method: str, path: str) -> bool:
    """Writes this script makes itself: the systems and policy, the Deployment controller's."""
    return (method == "POST" and path.endswith(("/recommendersystems", "/scalingpolicies"))) or (
        "/deployments/" in path and path.endswith("/status")
    )


def ready_count(custom: kubernetes.client.CustomObjectsApi) -> int:
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, "default", "recommendersystems")
    items = cast(dict[str, Any], listed)["items"]
    return sum(
        any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in (i.get("status") or {}).get("conditions", [])
        )
        for i in items
    )


def measure_floor(
    kube: ServerThread[KubeEmulator], api: kubernetes.client.ApiClient, n: int, admin: str
) -> float:
    """Seconds to create the children of n systems straight through the API (no operator)."""
    from recsys_operator.controller.kube import KubeClient

    client = KubeClient(api)
    policy = ScalingPolicy.model_validate(policy_doc())
    objects = []
    for i in range(n):
        doc = system_doc(f"floor-{i}", admin)
        doc["metadata"]["namespace"] = "floor"
        objects += render_system(RecommenderSystem.model_validate(doc), policy)
    started = time.perf_counter()
    for obj in objects:
        client.create(obj)
    return time.perf_counter() - started


def main() -> None:
    # Ctrl-C or a SIGTERM still stops the operator process this script started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--systems", type=int, default=200, help="how many RecommenderSystems (default 200)"
    )
    parser.add_argument(
        "--blocked", type=int, default=10, help="systems blocked on a missing policy (default 10)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="give up after this many seconds"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: 2 systems, resync every {QUICK_RESYNC_SECONDS} s",
    )
    args = parser.parse_args()
    if args.quick:
        args.systems, args.blocked, args.timeout = 2, 1, 120
        # Read by the operator process this script starts, so the steady-state wait is short.
        os.environ["RECSYS_RESYNC_SECONDS"] = str(QUICK_RESYNC_SECONDS)
    n, blocked = args.systems, args.blocked

    kube = ServerThread(KubeEmulator, name="kube").start()
    pulsar = ServerThread(PulsarAdminEmulator, name="pulsar-admin").start()
    workdir = Path(tempfile.mkdtemp(prefix="recsys-bench-"))
    kubeconfig = write_kubeconfig(workdir / "kubeconfig", kube.url)
    os.environ["KUBECONFIG"] = str(kubeconfig)
    kubernetes.config.load_kube_config(config_file=str(kubeconfig))
    api = kubernetes.client.ApiClient()
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        kubernetes.client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
    core = kubernetes.client.CoreV1Api(api)
    for namespace in ("default", "floor"):
        core.create_namespace(
            kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=namespace))
        )
    custom = kubernetes.client.CustomObjectsApi(api)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    floor = measure_floor(kube, api, n, pulsar.url)
    children = len(
        render_system(
            RecommenderSystem.model_validate(system_doc("x", pulsar.url)),
            ScalingPolicy.model_validate(policy_doc()),
        )
    )
    print(f"floor: {n * children} child objects created directly in {floor:.1f} s")

    # The operator as users run it: its own process, through the CLI.
    metrics_port = free_port()
    operator = ManagedProcess(
        "operator",
        [
            sys.executable,
            "-m",
            "recsys_operator.cli",
            "operator",
            "run",
            "--namespace",
            "default",
            "--metrics-address",
            f"127.0.0.1:{metrics_port}",
            "--log-level",
            "warning",
        ],
        workdir / "operator.log",
        metrics_port,
    ).start(ready_timeout=60)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    reconciles_total = "recsys_operator_reconciles_total"
    controller = DeploymentController(kubernetes.client.AppsV1Api(api))
    controller.start()
    try:
        mark = kube.handler.mark()
        started = time.perf_counter()
        custom.create_namespaced_custom_object(
            GROUP, VERSION, "default", "scalingpolicies", policy_doc()
        )
        for i in range(n):
            custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                "default",
                "recommendersystems",
                system_doc(f"sys-{i:04d}", pulsar.url),
            )
        for i in range(blocked):
            doc = system_doc(f"blocked-{i:04d}", pulsar.url)
            doc["spec"]["scalingPolicyRef"] = {"name": "missing"}
            custom.create_namespaced_custom_object(
                GROUP, VERSION, "default", "recommendersystems", doc
            )
        created = time.perf_counter() - started
        last_report = 0.0
        while (ready := ready_count(custom)) < n:
            elapsed = time.perf_counter() - started
            if elapsed > args.timeout:
                raise SystemExit(f"only {ready}/{n} Ready after {elapsed:.0f} s")
            if elapsed - last_report > 10:
                print(f"  {elapsed:5.0f} s: {ready}/{n} Ready", flush=True)
                last_report = elapsed
            time.sleep(1)
        all_ready = time.perf_counter() - started
        requests = len(kube.handler.requests_since(mark))
        reconciles = operator_counter(metrics_url, reconciles_total)
        print(
            f"created {n} systems in {created:.1f} s; all Ready after {all_ready:.1f} s "
            f"({all_ready / floor:.1f}x the floor)"
        )
        print(
            f"API requests: {requests} for {reconciles:.0f} reconciles = {requests / reconciles:.1f} per reconcile"
        )
        operator_writes = [
            r
            for r in kube.handler.writes_since(mark)
            if not benchmark_write(r.method.value, r.url.path)
        ]
        events = [r for r in operator_writes if r.url.path.endswith("/events")]
        print(
            f"operator writes per system created: {len(operator_writes) / (n + blocked):.1f} "
            f"(Events {len(events) / (n + blocked):.1f}; goal <= 25)"
        )

        # Steady state: wait for every system to be resynced once more, counting writes.
        def resyncs() -> float:
            return operator_counter(metrics_url, reconciles_total, trigger="resync")

        time.sleep(2)
        steady_mark, before = kube.handler.mark(), resyncs()
        steady_started = time.perf_counter()
        while (done := resyncs()) < before + 2 * (n + blocked):  # every system twice
            time.sleep(0.5)
        window = time.perf_counter() - steady_started
        writes = kube.handler.writes_since(steady_mark, exclude=("events",))
        steady_events = kube.handler.writes_since(steady_mark, resource="events")
        steady_requests = len(kube.handler.requests_since(steady_mark))
        print(
            f"steady state: {done - before:.0f} resync reconciles in {window:.0f} s, "
            f"{steady_requests} requests ({steady_requests / (done - before):.1f} per resync), "
            f"{len(writes)} writes (must be 0)"
        )
        per_hour = len(steady_events) / (n + blocked) / (window / 3600)
        print(
            f"steady state Events: {len(steady_events)} = {per_hour:.1f} per system per hour "
            f"({n} healthy, {blocked} blocked; goal 0)"
        )
        if writes:
            raise SystemExit("an unchanged system was written to")
    finally:
        controller.stopped.set()
        operator.stop()
        pulsar.stop()
        kube.stop()


if __name__ == "__main__":
    main()
