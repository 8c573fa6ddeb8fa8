"""The gateway: Deployment, Service and its routing ConfigMap."""

from __future__ import annotations

import json
from typing import Any

from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.render.naming import (
    CONFIG_HASH_ANNOTATION,
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
    pod_security_context,
    pulsar_token_env,
    restricted_security_context,
)
from recsys_operator.render.serving import INFERENCE_PORT
from recsys_operator.render.traffic import TrafficPlan

GATEWAY_PORT = 8000
ROUTING_FILE = "routing.json"


def gateway_routing(system: RecommenderSystem, plan: TrafficPlan) -> dict[str, Any]:
    """What the gateway needs to route a request: versions, weights, endpoints, topics."""
    namespace = system.metadata.namespace or "default"
    model = system.spec.model

    def endpoint(track: str, version: str) -> dict[str, Any]:
        host = f"{serving_name(system, track)}.{namespace}.svc"
        return {
            "version": version,
            "url": f"http://{host}:{INFERENCE_PORT}/predictions/{model.name}/{version}",
        }

    routing: dict[str, Any] = {
        "system": system_id(system),
        "stable": endpoint(Track.STABLE, plan.stable_version),
        "canary": None,
        "canaryWeight": 0,
        # A new salt per rollout reshuffles which users land in the canary.
        "salt": f"{system.metadata.name}:{plan.canary_version or plan.stable_version}",
        "timeoutMs": system.spec.gateway.timeout_ms,
        "defaultK": model.top_k,
        "maxK": model.top_k,
        "pulsarServiceUrl": system.spec.events.service_url,
        "interactionsTopic": topic_url(system, TOPIC_NAMES["interactions"]),
        "impressionsTopic": topic_url(system, TOPIC_NAMES["impressions"]),
    }
    if plan.canary_version:
        routing["canary"] = endpoint(Track.CANARY, plan.canary_version)
        routing["canaryWeight"] = plan.canary_weight
    return routing


def build_gateway_configmap(system: RecommenderSystem, plan: TrafficPlan) -> dict[str, Any]:
    text = json.dumps(gateway_routing(system, plan), indent=2, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(system, child_name(system, "gateway"), Component.GATEWAY),
        "data": {ROUTING_FILE: text},
    }


def build_gateway_deployment(
    system: RecommenderSystem, configmap: dict[str, Any], replicas: int | None
) -> dict[str, Any]:
    gateway = system.spec.gateway
    image = gateway.image or default_image(Component.GATEWAY)
    container = {
        "name": "gateway",
        "image": image,
        "args": [
            "gateway",
            "run",
            "--routing",
            f"/etc/recsys/{ROUTING_FILE}",
            "--port",
            str(GATEWAY_PORT),
        ],
        "env": [
            {"name": "RECSYS_GATEWAY_ADDRESS", "value": f"0.0.0.0:{GATEWAY_PORT}"},
            *pulsar_token_env(system),
        ],
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        "resources": container_resources(gateway.resources),
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "volumeMounts": [{"name": "routing", "mountPath": "/etc/recsys", "readOnly": True}],
        "securityContext": restricted_security_context(),
    }
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(system, Component.GATEWAY)},
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        },
        "template": {
            "metadata": {
                "labels": metadata(system, "", Component.GATEWAY)["labels"],
                # Routing changes (weights) are picked up from the mounted file without a
                # restart; only the rest of the pod spec rolls the pods.
                "annotations": {CONFIG_HASH_ANNOTATION: config_hash(container)},
            },
            "spec": {
                "containers": [container],
                "securityContext": pod_security_context(),
                "volumes": [
                    {"name": "routing", "configMap": {"name": configmap["metadata"]["name"]}}
                ],
            },
        },
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(system, child_name(system, "gateway"), Component.GATEWAY),
        "spec": spec,
    }


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
