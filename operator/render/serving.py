"""TorchServe serving: per model version a ConfigMap, a Deployment and a Service.

The stable and the canary version each get their own set (`<name>-serving` and
`<name>-serving-canary`), so the gateway can weight traffic between them; the
archive is fetched by an init container into an emptyDir model store.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from recsys_contracts.archive_layout import mar_file_name
from recsys_contracts.env_vars import ModelServerEnv
from recsys_operator.api.recommender_system import GPU_RESOURCE
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.render.deployment import build_deployment
from recsys_operator.render.naming import (
    Component,
    Track,
    config_hash,
    default_image,
    metadata,
    selector_labels,
    serving_name,
    system_id,
)
from recsys_operator.render.pods import (
    container_resources,
    redis_password_env,
    restricted_security_context,
)
from recsys_operator.render.torchserve_config import (
    DEFAULT_CONFIG_DIR,
    DEFAULT_MODEL_STORE,
    TorchServePorts,
    render_torchserve_files,
)

PORTS = TorchServePorts()
INFERENCE_PORT = PORTS.inference
TS_METRICS_PORT = PORTS.metrics
CONFIG_DIR = DEFAULT_CONFIG_DIR
MODEL_STORE = DEFAULT_MODEL_STORE
MANAGEMENT_BIND_ADDRESS = "127.0.0.1"
TORCHSERVE_LOG_DIR = "/home/model-server/logs"

FETCH_IMAGES = {
    "http": "curlimages/curl:8.11.1",
    "s3": "amazon/aws-cli:2.22.35",
    "pvc": "busybox:1.37",
}


class UnsupportedArchiveUri(ValueError):
    pass


def archive_file_name(system: RecommenderSystem, version: str) -> str:
    return mar_file_name(system.spec.model.name, version)


def archive_uri_for(system: RecommenderSystem, version: str) -> str:
    """The archive of `version`: the spec's for the spec's version, else the one status
    recorded when `version` was promoted (the stable version during a rollout)."""
    model = system.spec.model
    status = system.status
    if version == model.version:
        uri = model.archive_uri
    elif status is not None and version == status.stable_version:
        uri = status.stable_archive_uri
    else:
        uri = None
    if uri is None:
        raise UnsupportedArchiveUri(
            f"no archive known for model version {version!r}: spec.model.archiveUri is required "
            "in a cluster (only local mode trains a model)"
        )
    return uri


def build_fetch_archive_container(
    uri: str, file_name: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An init container copying the archive into the model store, and any extra volumes it needs."""
    target = f"{MODEL_STORE}/{file_name}"
    parsed = urlparse(uri)
    store_mount = {"name": "model-store", "mountPath": MODEL_STORE}
    base = {
        "name": "fetch-archive",
        "securityContext": restricted_security_context(),
        "volumeMounts": [store_mount],
    }
    if parsed.scheme in ("http", "https"):
        command = [
            "curl",
            "--fail",
            "--silent",
            "--show-error",
            "--location",
            "--retry",
            "5",
            "--output",
            target,
            uri,
        ]
        return {**base, "image": FETCH_IMAGES["http"], "command": command}, []
    if parsed.scheme == "s3":
        # Credentials come from the pod's service account (IRSA / workload identity).
        command = ["aws", "s3", "cp", "--only-show-errors", uri, target]
        env = [
            {"name": "HOME", "value": "/tmp"}
        ]  # the CLI writes a cache; the pod runs as non-root
        return {**base, "image": FETCH_IMAGES["s3"], "command": command, "env": env}, []
    if parsed.scheme == "pvc":
        claim, path = parsed.netloc, parsed.path.lstrip("/")
        if not claim or not path:
            raise UnsupportedArchiveUri(f"{uri!r}: expected pvc://CLAIM/PATH/TO/ARCHIVE.mar")
        source = {"name": "archive-source", "mountPath": "/source", "readOnly": True}
        container = {
            **base,
            "image": FETCH_IMAGES["pvc"],
            "command": ["cp", f"/source/{path}", target],
        }
        container["volumeMounts"] = [store_mount, source]
        volume = {
            "name": "archive-source",
            "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
        }
        return container, [volume]
    raise UnsupportedArchiveUri(
        f"spec.model.archiveUri {uri!r}: a cluster fetches http(s)://, s3:// or pvc:// archives; "
        "file:// is for local mode"
    )


def _track_meta(system: RecommenderSystem, track: str, version: str) -> dict[str, Any]:
    return metadata(
        system, serving_name(system, track), Component.SERVING, track=track, model_version=version
    )


def build_serving_configmap(system: RecommenderSystem, track: str, version: str) -> dict[str, Any]:
    # One version per pod: the stable and the canary scale and roll independently.
    files = render_torchserve_files(
        system.spec.model,
        system.spec.serving,
        versions=[version],
        ports=PORTS,
        # Inference for the gateway; metrics for Prometheus's scrape (both reachable only as
        # the NetworkPolicy allows). Management stays on loopback: with token auth off,
        # anything that reaches it could unload the model or scale its workers to 0.
        bind_address="0.0.0.0",
        management_bind_address=MANAGEMENT_BIND_ADDRESS,
        model_store=MODEL_STORE,
        config_dir=CONFIG_DIR,
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _track_meta(system, track, version),
        "data": files,
    }


def model_server_env(system: RecommenderSystem, version: str) -> list[dict[str, Any]]:
    """The handler's settings (`recsys_contracts.env_vars.ModelServerEnv`) as environment variables;
    local mode starts TorchServe with the same ones."""
    return [
        # One thread per worker: scale with batching and workers, not intra-op threads.
        {"name": "OMP_NUM_THREADS", "value": "1"},
        {"name": "MKL_NUM_THREADS", "value": "1"},
        {"name": ModelServerEnv.SYSTEM_ID, "value": system_id(system)},
        {"name": ModelServerEnv.REDIS_URL, "value": system.spec.features.store.url},
        {"name": ModelServerEnv.REDIS_MODE, "value": system.spec.features.store.mode.value},
        {"name": ModelServerEnv.MODEL_VERSION, "value": version},
        {"name": ModelServerEnv.MAX_K, "value": str(system.spec.model.top_k)},
        {
            "name": ModelServerEnv.QUANTIZE_TOWER,
            "value": str(system.spec.model.quantize_tower).lower(),
        },
        {
            "name": ModelServerEnv.CACHE_MAX_ENTRIES,
            "value": str(system.spec.serving.cache.max_entries),
        },
        {
            "name": ModelServerEnv.CACHE_TTL_MS,
            "value": str(system.spec.serving.cache.ttl_seconds * 1000),
        },
        *redis_password_env(system),
    ]


def build_serving_deployment(
    system: RecommenderSystem,
    track: str,
    version: str,
    configmap: dict[str, Any],
    replicas: int | None,
) -> dict[str, Any]:
    serving = system.spec.serving
    gpus = serving.resources.gpus
    file_name = archive_file_name(system, version)
    fetch, extra_volumes = build_fetch_archive_container(
        archive_uri_for(system, version), file_name
    )
    env = model_server_env(system, version)
    container = {
        "name": "torchserve",
        "image": serving.image or default_image(Component.SERVING, gpu=gpus > 0),
        "args": [
            "torchserve",
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            f"{CONFIG_DIR}/config.properties",
            "--model-store",
            MODEL_STORE,
        ],
        "env": env,
        "ports": [
            {"name": "inference", "containerPort": INFERENCE_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": TS_METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": container_resources(serving.resources),
        # Loading the archive (index included) can take minutes; the startup probe covers it.
        "startupProbe": {
            "httpGet": {"path": "/ping", "port": "inference"},
            "periodSeconds": 5,
            "failureThreshold": 120,
        },
        "readinessProbe": {"httpGet": {"path": "/ping", "port": "inference"}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/ping", "port": "inference"},
            "periodSeconds": 15,
            "failureThreshold": 4,
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "model-store", "mountPath": MODEL_STORE},
            # TorchServe's frontend writes its log folder under its working directory
            # (the image's WORKDIR); archives unpack into /tmp (`writable_tmp`).
            {"name": "logs", "mountPath": TORCHSERVE_LOG_DIR},
        ],
        "securityContext": restricted_security_context(),
    }
    pod = {
        "initContainers": [fetch],
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": configmap["metadata"]["name"]}},
            {"name": "model-store", "emptyDir": {}},
            {"name": "logs", "emptyDir": {}},
            *extra_volumes,
        ],
        "terminationGracePeriodSeconds": 30,
    }
    placement: dict[str, Any] = {}
    if serving.node_selector:
        placement["nodeSelector"] = dict(serving.node_selector)
    tolerations = [t.to_wire() for t in serving.tolerations]
    if gpus > 0 and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        placement["tolerations"] = tolerations
    return build_deployment(
        _track_meta(system, track, version),
        selector=selector_labels(system, Component.SERVING, track),
        pod_labels=_track_meta(system, track, version)["labels"],
        config_hash=config_hash(configmap["data"]),
        pod=pod,
        replicas=replicas,
        placement=placement,
    )


def build_serving_service(system: RecommenderSystem, track: str, version: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _track_meta(system, track, version),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(system, Component.SERVING, track),
            "ports": [
                {
                    "name": "inference",
                    "port": INFERENCE_PORT,
                    "targetPort": "inference",
                    "protocol": "TCP",
                },
                {
                    "name": "metrics",
                    "port": TS_METRICS_PORT,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                },
            ],
        },
    }


def serving_tracks(stable: str, canary: str | None) -> list[tuple[str, str]]:
    """(track, version) pairs that need serving objects."""
    return [(Track.STABLE, stable)] + ([(Track.CANARY, canary)] if canary else [])
