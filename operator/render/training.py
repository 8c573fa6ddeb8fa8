"""Retraining: a CronJob that runs `recsys retrain` on `spec.training.schedule`.

Each run reads the last `window` of the offline event log, trains a candidate, scores
it and the stable version (read from its archive in the model store) on the same newest
held-out slice, and writes a passing candidate and every verdict into the model store.
The verdict is also the pod's termination message (`/dev/termination-log`, at most 4096
bytes), which the operator can read from the pod's status without mounting the store.
So the model store is mounted read-write (a PVC) or reached over S3, the log mounted
read-only (a PVC) or read over S3; S3 with the pod's service-account credentials
(IRSA, workload identity), as the serving pods fetch s3:// archives. The stable version is rendered
into the arguments: when a rollout promotes another, the CronJob follows.

Runs never overlap (concurrencyPolicy Forbid): two at once would race for the model
store. A run past `deadline` is stopped and publishes nothing.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlparse

from recsys_contracts.api_base import parse_duration, quantity_value
from recsys_contracts.archive_layout import mar_file_name
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.api.training import TrainingSpec
from recsys_operator.render.naming import Component, child_name, default_image, metadata
from recsys_operator.render.pods import (
    container_resources,
    pod_security_context,
    restricted_security_context,
    writable_tmp,
)
from recsys_operator.render.traffic import traffic_plan

TERMINATION_LOG = "/dev/termination-log"
MODEL_STORE_MOUNT = "/model-store"
EVENT_LOG_MOUNT = "/event-log"
JOBS_KEPT = 3
"""Finished Jobs kept of each outcome, so the last runs' logs can be read."""
STARTING_DEADLINE_SECONDS = 3600
"""A run that could not start within an hour of its time (operator or cluster down) is skipped."""


class UnsupportedTrainingUri(ValueError):
    """A log or model-store URI a cluster run cannot use; the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def training_name(system: RecommenderSystem) -> str:
    return child_name(system, "training")


def _pvc(uri: str, field: str) -> tuple[str, str]:
    """(claim, path inside it) of a pvc://CLAIM/PATH URI."""
    parsed = urlparse(uri)
    if parsed.scheme != "pvc" or not parsed.netloc:
        raise UnsupportedTrainingUri(
            field,
            f"{uri!r}: a cluster run needs s3://BUCKET/PREFIX or pvc://CLAIM/PATH (file:// is "
            "for local mode)",
        )
    return parsed.netloc, parsed.path.strip("/")


def candidate_archive_uri(training: TrainingSpec, model_name: str, version: str) -> str:
    """Where a published candidate of `version` lies, as spec.model.archiveUri names it."""
    return f"{training.model_store_uri.rstrip('/')}/{mar_file_name(model_name, version)}"


def _stable_archive_problem(system: RecommenderSystem, stable_version: str) -> str | None:
    """Why the run could not find the stable archive in the model store (None: it can)."""
    training = system.spec.training
    assert training is not None
    if stable_version == system.spec.model.version:
        uri = system.spec.model.archive_uri
    else:
        uri = system.status.stable_archive_uri if system.status else None
    expected = candidate_archive_uri(training, system.spec.model.name, stable_version)
    if uri is not None and uri != expected:
        return (
            f"the stable version's archive {uri} is not in the model store: the run scores "
            f"the stable from {expected}"
        )
    return None


def runnable_stable_version(system: RecommenderSystem) -> str:
    """The version a run compares with; raises UnsupportedTrainingUri when its archive is
    not in the model store (every run would fail)."""
    stable_version = traffic_plan(system).stable_version
    problem = _stable_archive_problem(system, stable_version)
    if problem:
        raise UnsupportedTrainingUri("spec.training.modelStoreUri", problem)
    return stable_version


def retrain_args(
    system: RecommenderSystem,
    log: str,
    store: str,
    stable_version: str,
    threads: int,
    verdict_file: str | None,
) -> list[str]:
    """`recsys retrain` (without the program) with the spec's window and gate, on the
    log and model store at `log` and `store` as the run reaches them (and, when given,
    the file the verdict is also written to). The cluster's run and local mode's both."""
    training = system.spec.training
    assert training is not None
    gate = training.gate
    return [
        "retrain",
        "--log", log,
        "--model-store", store,
        "--name", system.spec.model.name,
        "--stable-version", stable_version,
        "--window", training.window,
        "--metric", gate.metric,
        "--min-improvement", str(gate.min_relative_improvement),
        "--min-users", str(gate.min_users),
        "--min-interactions", str(training.min_interactions),
        "--threads", str(threads),
    ] + (["--verdict-file", verdict_file] if verdict_file else [])  # fmt: skip


def cluster_locations(training: TrainingSpec) -> tuple[str, str]:
    """(log, model store) as a cluster run reaches them: a pvc:// one at its mount, an
    s3:// one as it is. Raises UnsupportedTrainingUri for one it cannot use."""
    store = training.model_store_uri
    if not store.startswith("s3://"):
        claim_path = _pvc(store, "spec.training.modelStoreUri")[1]
        store = f"{MODEL_STORE_MOUNT}/{claim_path}".rstrip("/")
    log = training.log_uri
    if log.startswith("pvc://"):
        log = f"{EVENT_LOG_MOUNT}/{_pvc(log, 'spec.training.logUri')[1]}".rstrip("/")
    elif log.startswith("file://"):
        raise UnsupportedTrainingUri(
            "spec.training.logUri",
            f"{log!r}: a cluster run reads s3:// or pvc:// logs (file:// is for local mode)",
        )
    return log, store


def training_args(
    system: RecommenderSystem, stable_version: str, verdict_file: str | None = TERMINATION_LOG
) -> list[str]:
    """`recsys retrain` of a cluster run: the spec's locations as mounted or over S3, a
    thread per requested CPU, and the verdict (by default) where the operator reads it,
    the pod's termination message."""
    training = system.spec.training
    assert training is not None
    log, store = cluster_locations(training)
    return retrain_args(
        system, log, store, stable_version, training_threads(training), verdict_file
    )


def training_threads(training: TrainingSpec) -> int:
    """One torch/numpy thread per requested CPU (at least one)."""
    cpu = training.resources.requests.get("cpu") or training.resources.limits.get("cpu") or 1
    return max(1, math.floor(quantity_value(cpu)))


def training_volumes(training: TrainingSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) for the model store and the log, those that are PVCs (an s3://
    one is reached over the network)."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if not training.model_store_uri.startswith("s3://"):
        store_claim, _ = _pvc(training.model_store_uri, "spec.training.modelStoreUri")
        volumes.append({"name": "model-store", "persistentVolumeClaim": {"claimName": store_claim}})
        mounts.append({"name": "model-store", "mountPath": MODEL_STORE_MOUNT})
    if training.log_uri.startswith("pvc://"):
        log_claim, _ = _pvc(training.log_uri, "spec.training.logUri")
        volumes.append(
            {
                "name": "event-log",
                "persistentVolumeClaim": {"claimName": log_claim, "readOnly": True},
            }
        )
        mounts.append({"name": "event-log", "mountPath": EVENT_LOG_MOUNT, "readOnly": True})
    return volumes, mounts


def build_training_cronjob(system: RecommenderSystem) -> dict[str, Any]:
    """The CronJob of `spec.training` (which must be set).

    Raises UnsupportedTrainingUri for a location a cluster run cannot use, or when the
    stable version's archive is not in the model store (every run would fail)."""
    training = system.spec.training
    assert training is not None, "render the training CronJob only when spec.training is set"
    stable_version = runnable_stable_version(system)
    volumes, mounts = training_volumes(training)
    container = {
        "name": "training",
        "image": training.image or default_image(Component.TRAINING),
        "command": ["recsys"],  # the model-server image's default command is TorchServe
        "args": training_args(system, stable_version),
        # torch and the archiver write caches under HOME; the root filesystem is read-only.
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": container_resources(training.resources),
        "volumeMounts": mounts,
        "securityContext": restricted_security_context(),
    }
    pod = writable_tmp({"containers": [container], "volumes": volumes})
    labels = metadata(system, "", Component.TRAINING)["labels"]
    job_spec = {
        "backoffLimit": 0,  # a failed run has written its verdict; the next schedule retries
        "activeDeadlineSeconds": int(parse_duration(training.deadline)),
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                **pod,
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "securityContext": pod_security_context(),
            },
        },
    }
    spec: dict[str, Any] = {
        "schedule": training.schedule,
        "concurrencyPolicy": "Forbid",
        "suspend": training.suspend,
        "startingDeadlineSeconds": STARTING_DEADLINE_SECONDS,
        "successfulJobsHistoryLimit": JOBS_KEPT,
        "failedJobsHistoryLimit": JOBS_KEPT,
        "jobTemplate": {"metadata": {"labels": labels}, "spec": job_spec},
    }
    if training.time_zone:
        spec["timeZone"] = training.time_zone
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": metadata(system, training_name(system), Component.TRAINING),
        "spec": spec,
    }
