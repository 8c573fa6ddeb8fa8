"""Pieces of pod specs that several components share."""

from __future__ import annotations

from typing import Any

from recsys_contracts.env_vars import GatewayEnv, ModelServerEnv
from recsys_operator.api.recommender_system import ResourceRequirements
from recsys_operator.api.resources import RecommenderSystem

METRICS_PORT = 9090


def container_resources(resources: ResourceRequirements) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if resources.requests:
        out["requests"] = {k: str(v) for k, v in resources.requests.items()}
    if resources.limits:
        out["limits"] = {k: str(v) for k, v in resources.limits.items()}
    return out


def restricted_security_context() -> dict[str, Any]:
    """Pod Security Standards "restricted" for a container."""
    return {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
        # What a process writes goes to the emptyDirs its pod mounts (`/tmp` in every one,
        # see `writable_tmp`), never into the image.
        "readOnlyRootFilesystem": True,
    }


TMP_VOLUME = "tmp"
TMP_DIR = "/tmp"


def writable_tmp(pod: dict[str, Any]) -> dict[str, Any]:
    """`pod` with an emptyDir at /tmp in each of its containers: with a read-only root
    filesystem that is where temporary files (downloads, TorchServe's unpacked archives)
    go. Other writable paths are the component's own volumes."""
    mount = {"name": TMP_VOLUME, "mountPath": TMP_DIR}

    def with_tmp(container: dict[str, Any]) -> dict[str, Any]:
        return {**container, "volumeMounts": [*container.get("volumeMounts", []), mount]}

    out = {**pod, "containers": [with_tmp(c) for c in pod["containers"]]}
    if pod.get("initContainers"):
        out["initContainers"] = [with_tmp(c) for c in pod["initContainers"]]
    out["volumes"] = [*pod.get("volumes", []), {"name": TMP_VOLUME, "emptyDir": {}}]
    return out


def pod_security_context() -> dict[str, Any]:
    """Non-root pods; fsGroup makes emptyDir volumes writable for that user."""
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def pulsar_token_env(system: RecommenderSystem) -> list[dict[str, Any]]:
    ref = system.spec.events.auth_secret_ref
    return [_secret_env(GatewayEnv.PULSAR_TOKEN, ref.name, ref.key)] if ref else []


def redis_password_env(system: RecommenderSystem) -> list[dict[str, Any]]:
    ref = system.spec.features.store.password_secret_ref
    return [_secret_env(ModelServerEnv.REDIS_PASSWORD, ref.name, ref.key)] if ref else []
