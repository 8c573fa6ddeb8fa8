"""The stream feature job: a Deployment consuming the interactions topic."""

from __future__ import annotations

from typing import Any

from recsys_contracts.api_base import parse_duration
from recsys_contracts.feature_job_settings import env_name
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.render.deployment import build_deployment
from recsys_operator.render.naming import (
    FEATURES_SUBSCRIPTION,
    TOPIC_NAMES,
    Component,
    child_name,
    config_hash,
    default_image,
    metadata,
    selector_labels,
    system_id,
    topic_url,
)
from recsys_operator.render.pods import (
    METRICS_PORT,
    container_resources,
    pulsar_token_env,
    redis_password_env,
    restricted_security_context,
)
from recsys_operator.render.traffic import traffic_plan

# Long enough to finish a batch and flush its Redis pipeline after SIGTERM.
FEATURES_GRACE_SECONDS = 60


def served_archives(system: RecommenderSystem) -> dict[str, str]:
    """version -> archive URI of every version taking traffic: stable and, during a
    rollout, the canary. The job keeps the online embeddings of each fresh, so stable's
    users are not left with stale ones while a canary runs or after it is rolled back."""
    plan = traffic_plan(system)
    spec_model = system.spec.model
    status = system.status
    archives = {}
    for version in plan.versions:
        if version == spec_model.version:
            uri = spec_model.archive_uri
        else:  # the promoted version the spec has moved on from
            uri = status.stable_archive_uri if status else None
        if uri:
            archives[version] = uri
    return archives


def feature_job_env(system: RecommenderSystem) -> list[dict[str, Any]]:
    """Configuration of `recsys features run`, as environment variables."""
    spec = system.spec
    features = spec.features
    settings = {
        "system_id": system_id(system),
        "pulsar_service_url": spec.events.service_url,
        # The job reports its subscription's backlog (the lag alert) from the admin API.
        "pulsar_admin_url": spec.events.admin_url,
        "interactions_topic": topic_url(system, TOPIC_NAMES["interactions"]),
        "dead_letter_topic": topic_url(system, TOPIC_NAMES["dead_letter"]),
        "subscription": FEATURES_SUBSCRIPTION,
        "subscription_type": spec.events.subscription_type.value,
        "redis_url": features.store.url,
        "redis_mode": features.store.mode.value,
        "store_ttl_seconds": str(int(parse_duration(features.store.ttl))),
        "last_n": str(features.last_n),
        "windows": ",".join(features.windows),
        "batch_size": str(features.batch_size),
        "allowed_lateness": features.allowed_lateness,
        "online_updates": str(features.online_updates.enabled).lower(),
        "learning_rate": str(features.online_updates.learning_rate),
        "decay": str(features.online_updates.decay),
        "metrics_address": f"0.0.0.0:{METRICS_PORT}",
    }
    archives = served_archives(system)
    if archives:
        settings["model_archives"] = ",".join(f"{v}={uri}" for v, uri in archives.items())
    values = {env_name(field): value for field, value in settings.items()}
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in values.items()]
    env += pulsar_token_env(system) + redis_password_env(system)
    return env


def build_feature_job_deployment(
    system: RecommenderSystem, replicas: int | None = None
) -> dict[str, Any]:
    """The feature job Deployment; `replicas` None leaves scaling to the autoscaler."""
    features = system.spec.features
    env = feature_job_env(system)
    labels = selector_labels(system, Component.FEATURES)
    container = {
        "name": "features",
        "image": features.image or default_image(Component.FEATURES),
        "args": ["features", "run"],
        "env": env,
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "resources": container_resources(features.resources),
        "readinessProbe": {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 10},
        "livenessProbe": {
            "httpGet": {"path": "/metrics", "port": "metrics"},
            "periodSeconds": 20,
            "failureThreshold": 6,
        },
        "securityContext": restricted_security_context(),
    }
    return build_deployment(
        metadata(system, child_name(system, "features"), Component.FEATURES),
        selector=labels,
        pod_labels=metadata(system, "", Component.FEATURES)["labels"],
        config_hash=config_hash(env, container["image"]),
        pod={"terminationGracePeriodSeconds": FEATURES_GRACE_SECONDS, "containers": [container]},
        replicas=replicas,
    )
