"""The Deployment skeleton every component's pods run under (serving, features, gateway).

Each component builds its own containers and pod fields; this adds what they all share:
the selector, a rolling update that never drops below the desired count, the pod labels
with the config-hash annotation that rolls the pods when their configuration changes,
the non-root pod security context, a writable /tmp (root filesystems are read-only),
and no service-account token unless the component asks for API access.
"""

from __future__ import annotations

from typing import Any

from recsys_operator.render.naming import CONFIG_HASH_ANNOTATION
from recsys_operator.render.pods import pod_security_context, writable_tmp


def build_deployment(
    metadata: dict[str, Any],
    selector: dict[str, str],
    pod_labels: dict[str, str],
    config_hash: str,
    pod: dict[str, Any],
    replicas: int | None,
    placement: dict[str, Any] | None = None,
    api_access: bool = False,
) -> dict[str, Any]:
    """A Deployment of pods with the fields in `pod` (containers, volumes, ...), then the pod
    security context, then `placement` (nodeSelector, tolerations) when given.

    `replicas` None leaves the count to the autoscaler (an applied count would fight it).
    `api_access` mounts the service account's token; pods that never call the
    Kubernetes API go without one, so a compromised process has no credential to use.
    """
    pod = {"automountServiceAccountToken": api_access, **writable_tmp(pod)}
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector},
        # A new pod is ready before an old one goes: capacity never dips during a roll.
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        },
        "template": {
            "metadata": {
                "labels": pod_labels,
                "annotations": {CONFIG_HASH_ANNOTATION: config_hash},
            },
            "spec": {**pod, "securityContext": pod_security_context(), **(placement or {})},
        },
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": spec}
