"""The gateway: Deployment, Service, its routing ConfigMap, and the right to watch it.

Gateways watch their ConfigMap through the Kubernetes API (`gateway.routing_configmap`)
rather than mounting it: the kubelet refreshes a mounted ConfigMap only every minute or
so, and a rollout promises every replica follows a weight change within 5 s. So each
system gets a ServiceAccount for its gateway pods and a Role that lets them get, list and
watch that one ConfigMap (`resourceNames`; the gateway lists and watches it with the
matching `metadata.name` field selector, which is what such a Role allows).
"""

from __future__ import annotations

import json
from typing import Any

from recsys_contracts.env_vars import GatewayEnv
from recsys_contracts.routing import ROUTING_KEY, Endpoint, Routing
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.render.deployment import build_deployment
from recsys_operator.render.naming import (
    TOPIC_NAMES,
    Component,
    Track,
    child_name,
    config_hash,
    default_image,
    metadata,
    selector_labels,
    serving_name,
    system_id,
    topic_url,
)
from recsys_operator.render.pods import (
    container_resources,
    pulsar_token_env,
    restricted_security_context,
)
from recsys_operator.render.serving import INFERENCE_PORT
from recsys_operator.render.traffic import TrafficPlan

GATEWAY_PORT = 8000
RBAC_GROUP = "rbac.authorization.k8s.io"
RBAC_API_VERSION = f"{RBAC_GROUP}/v1"


def request_id_key_env(system: RecommenderSystem) -> list[dict[str, Any]]:
    """The request-id signing keys from their Secret (the previous one may be absent)."""
    keys = system.spec.gateway.request_id_keys
    if keys is None:
        return []

    def ref(key: str, optional: bool) -> dict[str, Any]:
        return {"secretKeyRef": {"name": keys.secret_name, "key": key, "optional": optional}}

    return [
        {"name": GatewayEnv.REQUEST_ID_KEY, "valueFrom": ref(keys.current_key, False)},
        {"name": GatewayEnv.REQUEST_ID_PREVIOUS_KEY, "valueFrom": ref(keys.previous_key, True)},
    ]


def gateway_routing(system: RecommenderSystem, plan: TrafficPlan) -> dict[str, Any]:
    """What the gateway needs to route a request (`recsys_contracts.routing`): versions,
    weights, endpoints, topics, as the JSON document the ConfigMap holds."""
    namespace = system.metadata.namespace or "default"
    model = system.spec.model

    def endpoint(track: str, version: str) -> Endpoint:
        host = f"{serving_name(system, track)}.{namespace}.svc"
        # Stable asks for the model without a version: each pod serves the one version it
        # loaded. At a promotion the stable pods roll from the old version to the new one
        # while traffic already follows the new routing; a versioned URL would get 404s
        # (and fallbacks) from the pods not yet rolled. The canary track only ever holds
        # its own version, so its URL names it.
        path = f"/predictions/{model.name}" + (f"/{version}" if track == Track.CANARY else "")
        return Endpoint(version=version, url=f"http://{host}:{INFERENCE_PORT}{path}")

    routing = Routing(
        system=system_id(system),
        stable=endpoint(Track.STABLE, plan.stable_version),
        canary=endpoint(Track.CANARY, plan.canary_version) if plan.canary_version else None,
        canary_weight=plan.canary_weight if plan.canary_version else 0,
        shadow_percent=plan.shadow_percent if plan.canary_version else 0,
        # A new salt per rollout reshuffles which users land in the canary.
        salt=f"{system.metadata.name}:{plan.canary_version or plan.stable_version}",
        timeout_ms=system.spec.gateway.timeout_ms,
        max_in_flight=system.spec.gateway.max_in_flight,
        default_k=model.top_k,
        max_k=model.top_k,
        pulsar_service_url=system.spec.events.service_url,
        interactions_topic=topic_url(system, TOPIC_NAMES["interactions"]),
        impressions_topic=topic_url(system, TOPIC_NAMES["impressions"]),
    )
    document = routing.model_dump(mode="json", by_alias=True)
    if not routing.shadow_percent:
        del document["shadowPercent"]  # only during a shadow phase (older gateways ignore it)
    return document


def build_gateway_configmap(system: RecommenderSystem, plan: TrafficPlan) -> dict[str, Any]:
    text = json.dumps(gateway_routing(system, plan), indent=2, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(system, child_name(system, "gateway"), Component.GATEWAY),
        "data": {ROUTING_KEY: text},
    }


def build_gateway_service_account(system: RecommenderSystem) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(system, child_name(system, "gateway"), Component.GATEWAY),
    }


def build_gateway_role(system: RecommenderSystem, configmap: dict[str, Any]) -> dict[str, Any]:
    """Read access to the routing ConfigMap, and to nothing else."""
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": "Role",
        "metadata": metadata(system, child_name(system, "gateway"), Component.GATEWAY),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [configmap["metadata"]["name"]],
                "verbs": ["get", "list", "watch"],
            }
        ],
    }


def build_gateway_role_binding(
    system: RecommenderSystem, role: dict[str, Any], service_account: dict[str, Any]
) -> dict[str, Any]:
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": "RoleBinding",
        "metadata": metadata(system, child_name(system, "gateway"), Component.GATEWAY),
        "roleRef": {
            "apiGroup": RBAC_GROUP,
            "kind": "Role",
            "name": role["metadata"]["name"],
        },
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": service_account["metadata"]["name"],
                "namespace": service_account["metadata"]["namespace"],
            }
        ],
    }


def build_gateway_deployment(
    system: RecommenderSystem,
    configmap: dict[str, Any],
    service_account: dict[str, Any],
    replicas: int | None,
) -> dict[str, Any]:
    gateway = system.spec.gateway
    image = gateway.image or default_image(Component.GATEWAY)
    routing = f"{configmap['metadata']['namespace']}/{configmap['metadata']['name']}"
    container = {
        "name": "gateway",
        "image": image,
        "args": [
            "gateway",
            "run",
            "--routing-configmap",
            routing,
            "--port",
            str(GATEWAY_PORT),
        ],
        "env": [
            {"name": GatewayEnv.ADDRESS, "value": f"0.0.0.0:{GATEWAY_PORT}"},
            *pulsar_token_env(system),
            *request_id_key_env(system),
        ],
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        "resources": container_resources(gateway.resources),
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "securityContext": restricted_security_context(),
    }
    return build_deployment(
        metadata(system, child_name(system, "gateway"), Component.GATEWAY),
        selector=selector_labels(system, Component.GATEWAY),
        pod_labels=metadata(system, "", Component.GATEWAY)["labels"],
        # Routing changes (weights) reach the pods through their watch of the
        # ConfigMap, without a restart; only the rest of the pod spec rolls them.
        config_hash=config_hash(container),
        pod={
            "serviceAccountName": service_account["metadata"]["name"],
            "containers": [container],
        },
        replicas=replicas,
        # The token is how the gateway watches its routing ConfigMap.
        api_access=True,
    )


def build_gateway_service(system: RecommenderSystem) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(system, child_name(system, "gateway"), Component.GATEWAY),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(system, Component.GATEWAY),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }
