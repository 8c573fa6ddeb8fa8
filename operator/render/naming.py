"""Names, labels, images and annotations shared by every rendered child object.

One place decides what a child is called and how it is labelled, so the
operator, `recsys render`, the Helm chart tests and the docs agree.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from recsys_contracts import feature_keys
from recsys_operator import __version__
from recsys_operator.api.base import GROUP
from recsys_operator.api.resources import RecommenderSystem

IMAGE_REPOSITORY = "ghcr.io/recsys-operator"
MANAGED_BY = "recsys-operator"

# Label and annotation keys the operator reads back.
COMPONENT_LABEL = "app.kubernetes.io/component"
INSTANCE_LABEL = "app.kubernetes.io/instance"
TRACK_LABEL = f"{GROUP}/track"  # stable | canary
MODEL_VERSION_LABEL = f"{GROUP}/model-version"
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"


class Component:
    SERVING = "serving"
    FEATURES = "features"
    GATEWAY = "gateway"
    TRAINING = "training"


class Track:
    STABLE = "stable"
    CANARY = "canary"


def child_name(system: RecommenderSystem, part: str) -> str:
    """`<system>-<part>`; system names are capped so this stays a valid DNS label."""
    return f"{system.metadata.name}-{part}"


def serving_name(system: RecommenderSystem, track: str) -> str:
    return child_name(system, "serving" if track == Track.STABLE else "serving-canary")


def selector_labels(
    system: RecommenderSystem, component: str, track: str | None = None
) -> dict[str, str]:
    """Labels that select one component's pods; they never change for the object's lifetime."""
    labels = {
        "app.kubernetes.io/name": "recsys",
        INSTANCE_LABEL: system.metadata.name,
        COMPONENT_LABEL: component,
    }
    if track:
        labels[TRACK_LABEL] = track
    return labels


def label_selector(system: RecommenderSystem, component: str, track: str | None = None) -> str:
    """`selector_labels` as a label-selector query (`k=v,k=v`)."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(system, component, track).items())


def object_labels(
    system: RecommenderSystem,
    component: str,
    track: str | None = None,
    model_version: str | None = None,
) -> dict[str, str]:
    labels = {
        **selector_labels(system, component, track),
        "app.kubernetes.io/part-of": system.metadata.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/version": __version__,
    }
    if model_version:
        labels[MODEL_VERSION_LABEL] = model_version
    return labels


def metadata(
    system: RecommenderSystem,
    name: str,
    component: str,
    *,
    track: str | None = None,
    model_version: str | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": system.metadata.namespace or "default",
        "labels": object_labels(system, component, track, model_version),
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


def default_image(component: str, *, gpu: bool = False) -> str:
    """The image of this operator's own version for a component.

    Serving runs the model-server image (TorchServe + handler), and so does training
    (it holds torch, FAISS and the archiver); the stream job and the gateway share the
    stream-jobs image. Each is a target of the repository's
    Dockerfile of the same name (`model-server-gpu` for the gpu tag).
    """
    name = "model-server" if component in (Component.SERVING, Component.TRAINING) else "stream-jobs"
    tag = f"{__version__}-gpu" if gpu else __version__
    return f"{IMAGE_REPOSITORY}/{name}:{tag}"


def system_id(system: RecommenderSystem) -> str:
    """`<namespace>.<name>`: the system's id in feature-store keys, metrics labels and the gateway."""
    return feature_keys.system_id(system.metadata.namespace or "default", system.metadata.name)


def config_hash(*parts: Any) -> str:
    """A short, stable hash of configuration; as a pod annotation it rolls pods when config changes."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pulsar_namespace(system: RecommenderSystem) -> str:
    return (
        system.spec.events.namespace
        or f"{system.metadata.namespace or 'default'}-{system.metadata.name}"
    )


def topic_url(system: RecommenderSystem, topic: str) -> str:
    """Full Pulsar topic name, e.g. persistent://recsys/default-quickstart/interactions."""
    return f"persistent://{system.spec.events.tenant}/{pulsar_namespace(system)}/{topic}"


TOPIC_NAMES = {
    "interactions": "interactions",
    "impressions": "impressions",
    "dead_letter": "dead-letter",
}
FEATURES_SUBSCRIPTION = "recsys-features"
