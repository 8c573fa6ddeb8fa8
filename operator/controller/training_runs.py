"""The verdict of the last finished training run, for status.training.

A run's pod writes its verdict (`recsys_contracts.training_report.TrainingVerdict`) as
its termination message, so the operator reads it from the pod's status: no access to
the model store, the run's logs or its volumes. The newest verdict among the system's
training pods wins; a message that is not a verdict (a run killed before it wrote
one) is passed over. Finished Jobs and their pods are kept by the CronJob's history
limits, so the last verdict stays readable until newer runs replace it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from recsys_contracts.training_report import GateResult, TrainingVerdict
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.api.status import TrainingStatus
from recsys_operator.controller.kube import KubeClient
from recsys_operator.render.naming import Component, selector_labels
from recsys_operator.render.training import candidate_archive_uri


def _verdict(pod: dict[str, Any]) -> TrainingVerdict | None:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        message = ((container.get("state") or {}).get("terminated") or {}).get("message")
        if not message:
            continue
        try:
            return TrainingVerdict.model_validate_json(message.strip())
        except (ValidationError, json.JSONDecodeError):
            continue
    return None


def latest_training_status(kube: KubeClient, system: RecommenderSystem) -> TrainingStatus | None:
    """status.training from the newest verdict among the system's training pods.

    `system` as the user wrote it (not `serving_system`'s): a new verdict records the
    spec's model version, which decides whether autoRollout may serve its candidate."""
    training = system.spec.training
    if training is None:
        return None
    labels = selector_labels(system, Component.TRAINING)
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    pods = kube.list_objects("v1", "Pod", system.metadata.namespace, selector)
    found = [(v, p["metadata"]["name"]) for p in pods if (v := _verdict(p)) is not None]
    if not found:
        return None
    verdict, pod = max(found, key=lambda pair: pair[0].finished_at)
    passed = verdict.result is GateResult.PASSED
    previous = system.status.training if system.status else None
    if previous is not None and previous.job == pod and previous.last_run == verdict.finished_at:
        spec_version = previous.spec_model_version  # the spec as it was when it was first seen
    else:
        spec_version = system.spec.model.version
    return TrainingStatus(
        last_run=verdict.finished_at,
        job=pod,
        result=verdict.result,
        reason=verdict.reason,
        candidate_version=verdict.candidate_version,
        stable_version=verdict.stable_version,
        metric=verdict.gate.metric,
        candidate_score=verdict.candidate.value if verdict.candidate else None,
        stable_score=verdict.stable.value if verdict.stable else None,
        relative_improvement=verdict.relative_improvement,
        archive_uri=(
            candidate_archive_uri(training, verdict.model_name, verdict.candidate_version)
            if passed
            else None
        ),
        paired=verdict.paired,
        spec_model_version=spec_version,
    )
