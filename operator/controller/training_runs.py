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
from recsys_operator.api.status import RolloutCandidate, TrainingStatus, parse_rfc3339
from recsys_operator.controller.kube import KubeClient
from recsys_operator.render.naming import Component, label_selector
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

    `system` as the user wrote it (not `serving_system`'s): a new passing verdict records
    the spec's model version, which decides whether autoRollout may serve its candidate."""
    if system.spec.training is None:
        return None
    selector = label_selector(system, Component.TRAINING)
    pods = kube.list_objects("v1", "Pod", system.metadata.namespace, selector)
    found = [(v, p["metadata"]["name"]) for p in pods if (v := _verdict(p)) is not None]
    if not found:
        return None
    verdict, pod = max(found, key=lambda pair: parse_rfc3339(pair[0].finished_at))
    previous = system.status.training if system.status else None
    if previous is not None and parse_rfc3339(previous.last_run) > parse_rfc3339(
        verdict.finished_at
    ):
        # The newest run's pod is gone (pod GC, by hand): status keeps it rather than go
        # back to an older verdict, whose candidate would be stamped afresh and served.
        return previous
    return training_status(verdict, pod, system, previous)


def training_status(
    verdict: TrainingVerdict,
    job: str,
    system: RecommenderSystem,
    previous: TrainingStatus | None,
) -> TrainingStatus:
    """status.training for `verdict` (of the run `job`), given the one recorded before it.

    The candidate autoRollout serves (`rolloutCandidate`) is this verdict's when it passed,
    stamped with the spec's model version the first time the verdict is seen; a verdict that
    did not pass keeps the one before, unless the spec changed since (a person took over).
    Local mode records its runs' verdicts with this function too."""
    training = system.spec.training
    assert training is not None
    passed = verdict.result is GateResult.PASSED
    archive = (
        candidate_archive_uri(training, verdict.model_name, verdict.candidate_version)
        if passed
        else None
    )
    spec_version = system.spec.model.version
    seen = previous is not None and previous.job == job and previous.last_run == verdict.finished_at
    kept = previous.rollout_candidate if previous is not None else None
    if seen:
        candidate = kept  # stamped when first seen; the spec may have changed since
    elif archive is not None:
        candidate = RolloutCandidate(
            version=verdict.candidate_version, archive_uri=archive, spec_model_version=spec_version
        )
    else:
        candidate = kept if kept is not None and kept.spec_model_version == spec_version else None
    return TrainingStatus(
        last_run=verdict.finished_at,
        job=job,
        result=verdict.result,
        reason=verdict.reason,
        candidate_version=verdict.candidate_version,
        stable_version=verdict.stable_version,
        metric=verdict.gate.metric,
        candidate_score=verdict.candidate.value if verdict.candidate else None,
        stable_score=verdict.stable.value if verdict.stable else None,
        relative_improvement=verdict.relative_improvement,
        archive_uri=archive,
        paired=verdict.paired,
        rollout_candidate=candidate,
    )
