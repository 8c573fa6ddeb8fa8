"""Retraining on KubeRay (`spec.training.engine: RayJob`): a RayCronJob that starts a RayJob.

A RayJob is one run: KubeRay creates a Ray cluster for it (a head and `ray.workers`),
submits the entrypoint when the cluster is up, and shuts the cluster down when the job
ends. The schedule comes from KubeRay's RayCronJob (KubeRay 1.6 or later, alpha), which
creates a RayJob from its `jobTemplate` on each tick, as a CronJob creates Jobs: the
documented way to run RayJobs on a schedule, so the operator keeps no clock of its own.

The entrypoint is the same `recsys retrain` as the CronJob's; the trainer (recency EASE)
is one process, so it runs as the Ray job's driver on the head, which mounts the model
store and the log. Workers add Ray capacity that the trainer does not use yet.

The verdict reaches the operator as with the CronJob, as a pod's termination message: the
submitter pod (labelled as a training pod) runs `ray job submit`, which waits for the job
and prints its output, and writes the verdict line it printed to /dev/termination-log.
The Ray pods carry no labels of the system, so the system's default-deny NetworkPolicy
leaves the traffic between them alone.

Differences from the CronJob, both from the RayCronJob API: it has no time zone (the
schedule is UTC; the API refuses a timeZone with this engine) and no concurrency policy,
so a run longer than the schedule's period overlaps the next one: keep `deadline` below
the period.
"""

from __future__ import annotations

import shlex
from typing import Any

from recsys_contracts.api_base import parse_duration
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.api.training import RaySpec, TrainingSpec
from recsys_operator.render.naming import Component, metadata, selector_labels
from recsys_operator.render.pods import (
    container_resources,
    pod_security_context,
    restricted_security_context,
    writable_tmp,
)
from recsys_operator.render.training import (
    TERMINATION_LOG,
    runnable_stable_version,
    training_args,
    training_name,
    training_volumes,
)

RAY_GROUP = "ray.io"
RAY_API_VERSION = f"{RAY_GROUP}/v1"
RAY_SCHEDULE_KIND = "RayCronJob"
WORKER_GROUP = "workers"
CLUSTER_TTL_SECONDS = 60
"""The run's Ray cluster is deleted this long after the job ends."""
SUBMITTER_RESOURCES = {
    "requests": {"cpu": "100m", "memory": "256Mi"},
    "limits": {"memory": "512Mi"},
}
"""`ray job submit` only waits and prints: a small pod."""
DASHBOARD_WAIT_SECONDS = 180
"""How long the submitter waits for the head's dashboard to answer before giving up."""
RUN_LOG = '"${TMPDIR:-/tmp}/run.log"'
"""The job's output, kept to pick the verdict from (the pod's /tmp is an emptyDir)."""
VERDICT_LINE = '^{"format":'
"""How the verdict's line of JSON starts in the job's output (`recsys retrain` prints it last)."""


def _ray(training: TrainingSpec) -> RaySpec:
    assert training.ray is not None, "the API requires spec.training.ray with engine RayJob"
    return training.ray


def _ray_pod(container: dict[str, Any], volumes: list[dict[str, Any]]) -> dict[str, Any]:
    pod = writable_tmp({"containers": [container], "volumes": volumes})
    return {
        "spec": {
            **pod,
            "automountServiceAccountToken": False,
            "securityContext": pod_security_context(),
        }
    }


def _ray_container(name: str, image: str, resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        # torch, the archiver and Ray write under HOME and /tmp; the root filesystem is read-only.
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": resources,
        "securityContext": restricted_security_context(),
    }


def submitter_script(entrypoint: list[str], verdict_path: str = TERMINATION_LOG) -> str:
    """Wait for the dashboard, submit the run and follow it, keep its verdict line as the
    pod's termination message, and exit as the run did."""
    address = '"http://$RAY_DASHBOARD_ADDRESS"'
    attempts = DASHBOARD_WAIT_SECONDS // 2
    return "\n".join(
        [
            f"for attempt in $(seq {attempts}); do",
            f"  ray job list --address {address} >/dev/null 2>&1 && break; sleep 2",
            "done",
            f'ray job submit --address {address} --submission-id "$RAY_JOB_SUBMISSION_ID" -- '
            f"{shlex.join(entrypoint)} >{RUN_LOG} 2>&1",
            "status=$?",
            f"cat {RUN_LOG}",
            f"grep '{VERDICT_LINE}' {RUN_LOG} | tail -n 1 > {shlex.quote(verdict_path)}",
            'exit "$status"',
        ]
    )


def build_training_raycronjob(system: RecommenderSystem) -> dict[str, Any]:
    """The RayCronJob of `spec.training` with engine RayJob (which must be set).

    Raises UnsupportedTrainingUri as `build_training_cronjob` does."""
    training = system.spec.training
    assert training is not None, "render the training RayCronJob only when spec.training is set"
    ray = _ray(training)
    entrypoint = ["recsys", *training_args(system, runnable_stable_version(system), None)]
    volumes, mounts = training_volumes(training)

    head = {
        **_ray_container("ray-head", ray.image, container_resources(training.resources)),
        "volumeMounts": mounts,
    }
    cluster: dict[str, Any] = {
        "rayVersion": ray.ray_version,
        "headGroupSpec": {"rayStartParams": {}, "template": _ray_pod(head, volumes)},
    }
    if ray.workers.replicas:
        worker = _ray_container("ray-worker", ray.image, container_resources(ray.workers.resources))
        cluster["workerGroupSpecs"] = [
            {
                "groupName": WORKER_GROUP,
                "replicas": ray.workers.replicas,
                "minReplicas": ray.workers.replicas,
                "maxReplicas": ray.workers.replicas,
                "rayStartParams": {},
                "template": _ray_pod(worker, []),
            }
        ]
    submitter = {
        **_ray_container("submitter", ray.image, SUBMITTER_RESOURCES),
        "command": ["sh", "-c", submitter_script(entrypoint)],
    }
    submitter_pod = _ray_pod(submitter, [])
    submitter_pod["spec"]["restartPolicy"] = "Never"
    # Labelled as a training pod: the operator reads the verdict from its status.
    submitter_pod["metadata"] = {"labels": selector_labels(system, Component.TRAINING)}

    job_template = {
        "entrypoint": shlex.join(entrypoint),
        "rayClusterSpec": cluster,
        "submissionMode": "K8sJobMode",
        "submitterPodTemplate": submitter_pod,
        # A failed run has written its verdict; the next schedule retries.
        "backoffLimit": 0,
        "submitterConfig": {"backoffLimit": 0},
        "activeDeadlineSeconds": int(parse_duration(training.deadline)),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": CLUSTER_TTL_SECONDS,
    }
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": RAY_SCHEDULE_KIND,
        "metadata": metadata(system, training_name(system), Component.TRAINING),
        "spec": {
            "schedule": training.schedule,
            "suspend": training.suspend,
            "jobTemplate": job_template,
        },
    }
