"""NetworkPolicies: each component's pods accept only the traffic the system needs.

- a default-deny of ingress for every pod of the system; the allow policies below add to it
  (NetworkPolicies are additive);
- serving: its inference port from this system's gateway pods; its metrics port from
  Prometheus;
- the feature job: its metrics port from Prometheus, nothing else;
- the gateway: its HTTP port (requests, events, /metrics) from anywhere (it is the front
  door), and egress only to DNS, this system's serving pods, the Pulsar broker and the
  Kubernetes API (its routing watch). So of this system's pods only serving and the
  feature job can reach Redis. Redis itself is not ours to manage (it may live anywhere),
  so no ingress rule is rendered for it: docs/operations.md shows the policy to put there.

Prometheus is any source unless the operator is told its namespace
(`--prometheus-namespace`). Kubelet probes come from the node and are not subject to these
rules in the common CNIs.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.render.naming import (
    COMPONENT_LABEL,
    Component,
    child_name,
    metadata,
    selector_labels,
)
from recsys_operator.render.pods import METRICS_PORT

NETWORK_API_VERSION = "networking.k8s.io/v1"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# The API server's Service port, and the port its endpoints commonly listen on (policies
# see the destination after the Service's translation in most CNIs).
KUBE_API_PORTS = (443, 6443)
DNS_PORT = 53
TS_METRICS_PORT_NAME = "metrics"  # serving's container port of that name (8082)
DEFAULT_PULSAR_PORTS = {"pulsar": 6650, "pulsar+ssl": 6651}


def _component_pods(system: RecommenderSystem, component: str) -> dict[str, Any]:
    """Every pod of one component, both serving tracks included."""
    return {"matchLabels": selector_labels(system, component)}


def _tcp(port: int | str) -> dict[str, Any]:
    return {"protocol": "TCP", "port": port}


def prometheus_peers(prometheus_namespace: str | None) -> list[dict[str, Any]] | None:
    """Where scrapes come from: Prometheus's namespace, or None (any source)."""
    if prometheus_namespace is None:
        return None
    return [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: prometheus_namespace}}}]


def _rule(ports: list[dict[str, Any]], peers: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"ports": ports, **({"from": peers} if peers is not None else {})}


def _policy(
    system: RecommenderSystem, name: str, component: str | None, spec: dict[str, Any]
) -> dict[str, Any]:
    meta = metadata(system, name, component or "system")
    return {
        "apiVersion": NETWORK_API_VERSION,
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": spec,
    }


def build_default_deny_policy(system: RecommenderSystem) -> dict[str, Any]:
    """No ingress to any pod of the system but what an allow policy names."""
    labels = selector_labels(system, Component.GATEWAY)
    del labels[COMPONENT_LABEL]  # every component's pods
    pods = {"matchLabels": labels}
    return _policy(
        system,
        child_name(system, "default-deny"),
        None,
        {"podSelector": pods, "policyTypes": ["Ingress"]},
    )


def build_serving_policy(
    system: RecommenderSystem, inference_port: int, prometheus: list[dict[str, Any]] | None
) -> dict[str, Any]:
    gateway = [{"podSelector": _component_pods(system, Component.GATEWAY)}]
    return _policy(
        system,
        child_name(system, "serving"),
        Component.SERVING,
        {
            "podSelector": _component_pods(system, Component.SERVING),
            "policyTypes": ["Ingress"],
            "ingress": [
                _rule([_tcp(inference_port)], gateway),
                _rule([_tcp(TS_METRICS_PORT_NAME)], prometheus),
            ],
        },
    )


def build_features_policy(
    system: RecommenderSystem, prometheus: list[dict[str, Any]] | None
) -> dict[str, Any]:
    return _policy(
        system,
        child_name(system, "features"),
        Component.FEATURES,
        {
            "podSelector": _component_pods(system, Component.FEATURES),
            "policyTypes": ["Ingress"],
            "ingress": [_rule([_tcp(METRICS_PORT)], prometheus)],
        },
    )


def pulsar_port(service_url: str) -> int:
    parsed = urlparse(service_url)
    return parsed.port or DEFAULT_PULSAR_PORTS.get(parsed.scheme, 6650)


def build_gateway_policy(
    system: RecommenderSystem, gateway_port: int, inference_port: int
) -> dict[str, Any]:
    """Ingress to the HTTP port from anywhere; egress only where the gateway must go."""
    dns = [{"protocol": "UDP", "port": DNS_PORT}, _tcp(DNS_PORT)]
    return _policy(
        system,
        child_name(system, "gateway"),
        Component.GATEWAY,
        {
            "podSelector": _component_pods(system, Component.GATEWAY),
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": [_tcp(gateway_port)]}],
            "egress": [
                {"ports": dns},
                {
                    "to": [{"podSelector": _component_pods(system, Component.SERVING)}],
                    "ports": [_tcp(inference_port)],
                },
                # The broker may be anywhere (another namespace, outside the cluster).
                {"ports": [_tcp(pulsar_port(system.spec.events.service_url))]},
                {"ports": [_tcp(port) for port in KUBE_API_PORTS]},
            ],
        },
    )


def build_network_policies(
    system: RecommenderSystem,
    *,
    gateway_port: int,
    inference_port: int,
    prometheus_namespace: str | None,
) -> list[dict[str, Any]]:
    """The allow policies first, the default-deny last: applied in this order, allowed
    traffic is never cut off on the way."""
    prometheus = prometheus_peers(prometheus_namespace)
    return [
        build_serving_policy(system, inference_port, prometheus),
        build_features_policy(system, prometheus),
        build_gateway_policy(system, gateway_port, inference_port),
        build_default_deny_policy(system),
    ]
