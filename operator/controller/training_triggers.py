"""Acting on spec.training.triggers: read Prometheus, decide, start a training run.

A run a trigger starts is a Job made from the training CronJob's jobTemplate exactly as
`kubectl create job --from=cronjob/NAME` makes one: the template's labels and
annotations, `cronjob.kubernetes.io/instantiate: manual`, and the CronJob as its
controlling owner. So it is the same run as a scheduled one (the same `recsys retrain`
arguments, the same verdict read into status.training), the CronJob's history limits
and garbage collection cover it, and concurrencyPolicy Forbid holds the next scheduled
run while it is active.

With `engine: RayJob` there is no CronJob: the run is a RayJob made from the training
RayCronJob's jobTemplate, as the RayCronJob controller makes one on a tick, owned by the
RayCronJob.

No run starts while one of the system's training Jobs (or RayJobs) is active, nor within the cooldown
after the newest one started (scheduled or triggered). What was read, the last run
started and why a fired trigger waits go to status.trainingTriggers, with the
TrainingTriggers condition; each run started is announced in an Event.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from recsys_contracts.field_issues import InvalidResource
from recsys_operator.api.reasons import ConditionReason, EventReason
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.api.status import ConditionType, parse_rfc3339, rfc3339
from recsys_operator.api.training import TrainingEngine
from recsys_operator.api.trigger_status import (
    DriftReading,
    TrainingTriggersStatus,
    TriggerRecord,
)
from recsys_operator.controller.conditions import condition, merge_conditions
from recsys_operator.controller.kube import KubeClient
from recsys_operator.controller.reconcile import parse_system
from recsys_operator.controller.rollout_driver import blocking_reason
from recsys_operator.render.naming import Component, label_selector, system_id
from recsys_operator.render.ray_training import RAY_API_VERSION, RAY_SCHEDULE_KIND
from recsys_operator.render.training import training_name
from recsys_operator.retraining.trigger_metrics import PrometheusTriggerMetrics
from recsys_operator.retraining.triggers import (
    NO_ANSWER,
    Firing,
    Readings,
    TriggerMetrics,
    cooldown_s,
    hold_reason,
    take_readings,
)

INSTANTIATE_ANNOTATION = "cronjob.kubernetes.io/instantiate"
TRIGGER_ANNOTATION = "recsys.dev/training-trigger"
"""On a triggered Job: which trigger and check started it, e.g. `Drift/PSI`."""
MAX_NAME = 63  # the Job controller puts the Job's name in a label value
RAY_RUN_KIND = "RayJob"
RAY_FINISHED = frozenset({"Complete", "Failed", "ValidationFailed"})
"""RayJob `status.jobDeploymentStatus` values after which KubeRay does nothing more."""


def _seconds(text: str | None) -> float | None:
    return parse_rfc3339(text).timestamp() if text else None


def job_from_cronjob(cronjob: dict[str, Any], name: str, trigger: str) -> dict[str, Any]:
    """The Job `kubectl create job NAME --from=cronjob/...` creates, marked with the trigger."""
    template = copy.deepcopy(cronjob["spec"]["jobTemplate"])
    meta = template.get("metadata") or {}
    cron_meta = cronjob["metadata"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": cron_meta["namespace"],
            "labels": dict(meta.get("labels") or {}),
            "annotations": {
                **(meta.get("annotations") or {}),
                INSTANTIATE_ANNOTATION: "manual",
                TRIGGER_ANNOTATION: trigger,
            },
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "CronJob",
                    "name": cron_meta["name"],
                    "uid": cron_meta["uid"],
                    # As kubectl: no blockOwnerDeletion, which would need `update` on
                    # cronjobs/finalizers where OwnerReferencesPermissionEnforcement runs.
                    "controller": True,
                }
            ],
        },
        "spec": template["spec"],
    }


def rayjob_from_raycronjob(raycronjob: dict[str, Any], name: str, trigger: str) -> dict[str, Any]:
    """The RayJob of one run from the RayCronJob's jobTemplate (a RayJob spec), owned by
    the RayCronJob and labelled as it is, marked with the trigger."""
    cron_meta = raycronjob["metadata"]
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": RAY_RUN_KIND,
        "metadata": {
            "name": name,
            "namespace": cron_meta["namespace"],
            "labels": dict(cron_meta.get("labels") or {}),
            "annotations": {TRIGGER_ANNOTATION: trigger},
            "ownerReferences": [
                {
                    "apiVersion": RAY_API_VERSION,
                    "kind": RAY_SCHEDULE_KIND,
                    "name": cron_meta["name"],
                    "uid": cron_meta["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": copy.deepcopy(raycronjob["spec"]["jobTemplate"]),
    }


def triggered_job_name(cronjob_name: str, firing: Firing, now: datetime) -> str:
    suffix = f"-{firing.trigger.value.lower()}-{int(now.timestamp())}"
    return cronjob_name[: MAX_NAME - len(suffix)].rstrip("-") + suffix


def job_active(job: dict[str, Any]) -> bool:
    """Not finished: neither a completion time nor a true Complete or Failed condition
    (a RayJob: neither an end time nor a final deployment status)."""
    status = job.get("status") or {}
    if status.get("completionTime") or status.get("endTime"):
        return False
    if job.get("kind") == RAY_RUN_KIND:
        return status.get("jobDeploymentStatus") not in RAY_FINISHED
    return not any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def job_started_s(job: dict[str, Any]) -> float | None:
    status = job.get("status") or {}
    return _seconds(status.get("startTime") or job["metadata"].get("creationTimestamp"))


@dataclass
class TriggerOutcome:
    """What one evaluation decided: the status patch (None: unchanged), the Events, the Job."""

    patch: dict[str, Any] | None = None
    events: list[tuple[str, str, bool]] = field(default_factory=list)  # reason, message, warning
    job: str | None = None
    system: str = ""  # `<namespace>.<name>`, the metrics' system label
    drift: DriftReading | None = None  # this evaluation's drift reading, for the metric


def _condition(readings: Readings, generation: int) -> Any:
    kind = ConditionType.TRAINING_TRIGGERS
    if readings.unsupported:
        reason = ConditionReason.DRIFT_SOURCE_NOT_SUPPORTED
        return condition(kind, False, reason, readings.unsupported, generation)
    parts = [r for r in (readings.performance, readings.drift) if r is not None]
    message = "; ".join(r.message for r in parts)
    if any(r.message == NO_ANSWER for r in parts):
        return condition(kind, None, ConditionReason.TRIGGER_METRICS_MISSING, message, generation)
    return condition(kind, True, ConditionReason.TRIGGERS_WATCHING, message, generation)


def _without_times(value: Any) -> Any:
    """A status part minus its reading times: a reading that did not change is not rewritten."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k != "time"}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def _merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` as a merge patch over `old`: a merge patch keeps the keys it does not name,
    so those `new` dropped (at any depth) are named as null."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        patch[key] = (
            _merge_patch(before, value)
            if isinstance(value, dict) and isinstance(before, dict)
            else value
        )
    return patch


def _clear(old: dict[str, Any]) -> TriggerOutcome:
    """No triggers in the spec (any more): drop what earlier evaluations wrote."""
    if "trainingTriggers" not in old:
        return TriggerOutcome()
    kept = [
        c for c in old.get("conditions") or [] if c.get("type") != ConditionType.TRAINING_TRIGGERS
    ]
    return TriggerOutcome(patch={"trainingTriggers": None, "conditions": kept})


def _start_run(
    kube: KubeClient, system: RecommenderSystem, firing: Firing, now: datetime
) -> tuple[str | None, str | None]:
    """(the Job created, None) or (None, why none was)."""
    namespace = system.metadata.namespace or "default"
    trigger = f"{firing.trigger.value}/{firing.check}"
    api_version, schedule_kind = _schedule_kind(system)
    schedule = kube.get(api_version, schedule_kind, namespace, training_name(system))
    if schedule is None:
        return None, f"the training {schedule_kind} is not created yet"
    name = triggered_job_name(schedule["metadata"]["name"], firing, now)
    if schedule_kind == RAY_SCHEDULE_KIND:
        run = rayjob_from_raycronjob(schedule, name, trigger)
    else:
        run = job_from_cronjob(schedule, name, trigger)
    try:
        kube.create(run)
    except ApiException as exc:  # forbidden (RBAC older than triggers), a lost answer, ...
        return None, f"creating {run['kind']} {name} failed: {exc.status} {exc.reason}"
    return name, None


def _schedule_kind(system: RecommenderSystem) -> tuple[str, str]:
    """(apiVersion, kind) of the object whose template a triggered run is made from."""
    training = system.spec.training
    if training is not None and training.engine is TrainingEngine.RAY_JOB:
        return RAY_API_VERSION, RAY_SCHEDULE_KIND
    return "batch/v1", "CronJob"


def _runs(kube: KubeClient, system: RecommenderSystem, selector: str) -> list[dict[str, Any]]:
    """The system's training runs that hold or delay a triggered one: its Jobs, and with
    the Ray engine the RayJobs its RayCronJob owns (scheduled ones as well as triggered:
    KubeRay's carry no labels of the system, only the owner reference)."""
    namespace = system.metadata.namespace or "default"
    runs = kube.list_objects("batch/v1", "Job", namespace, selector)
    if _schedule_kind(system)[1] == RAY_SCHEDULE_KIND:
        schedule = kube.get(RAY_API_VERSION, RAY_SCHEDULE_KIND, namespace, training_name(system))
        owner = (schedule or {}).get("metadata", {}).get("uid")
        for ray_job in kube.list_objects(RAY_API_VERSION, RAY_RUN_KIND, namespace):
            owners = ray_job["metadata"].get("ownerReferences") or []
            if owner and any(ref.get("uid") == owner for ref in owners):
                runs.append({"kind": RAY_RUN_KIND, **ray_job})
    return runs


async def evaluate_triggers(
    kube: KubeClient,
    body: dict[str, Any],
    prometheus_url: str,
    *,
    metrics: TriggerMetrics | None = None,
    now: datetime | None = None,
) -> TriggerOutcome:
    """Read and decide the triggers of one system; start a run if one fires and may."""
    old = body.get("status") or {}
    if blocking_reason(body):
        return TriggerOutcome()  # the reconcile reports why nothing is applied
    try:
        system = parse_system(body)
    except InvalidResource:
        return TriggerOutcome()
    training = system.spec.training
    triggers = training.triggers if training else None
    if (
        training is None
        or triggers is None
        or (triggers.performance, triggers.drift) == (None, None)
    ):
        return _clear(old)
    now = now or datetime.now(UTC)
    stamp = rfc3339(now)
    stable = old.get("stableVersion") or system.spec.model.version
    metrics = metrics or PrometheusTriggerMetrics(prometheus_url, system_id(system))
    readings = await take_readings(training, metrics, stable, stamp)

    previous = TrainingTriggersStatus.model_validate(old.get("trainingTriggers") or {})
    state = TrainingTriggersStatus(
        performance=readings.performance, drift=readings.drift, last_trigger=previous.last_trigger
    )
    outcome = TriggerOutcome(system=system_id(system), drift=readings.drift)
    if readings.firings:
        firing = readings.firings[0]
        selector = label_selector(system, Component.TRAINING)
        jobs = await asyncio.to_thread(_runs, kube, system, selector)
        starts = [s for j in jobs if (s := job_started_s(j)) is not None]
        if previous.last_trigger is not None:
            starts.append(_seconds(previous.last_trigger.time) or 0.0)
        hold = hold_reason(
            now_s=now.timestamp(),
            active_jobs=[j["metadata"]["name"] for j in jobs if job_active(j)],
            last_start_s=max(starts, default=None),
            cooldown=cooldown_s(triggers),
            suspended=training.suspend,
        )
        if hold is None:
            job, hold = await asyncio.to_thread(_start_run, kube, system, firing, now)
            if job is not None:
                state.last_trigger = TriggerRecord(
                    trigger=firing.trigger,
                    check=firing.check,
                    value=firing.value,
                    threshold=firing.threshold,
                    time=stamp,
                    job=job,
                )
                outcome.job = job
                outcome.events.append(
                    (
                        EventReason.TRAINING_TRIGGERED,
                        f"started training run {job}: {firing.message}",
                        False,
                    )
                )
        if hold is not None:
            state.waiting = f"{firing.message}; no run started: {hold}"

    generation = int(body.get("metadata", {}).get("generation") or 0)
    cond = _condition(readings, generation)
    conditions = merge_conditions(old.get("conditions") or [], [cond])
    wire = state.to_wire()
    changed = _without_times(wire) != _without_times(old.get("trainingTriggers")) or conditions != (
        old.get("conditions") or []
    )
    if changed:
        patch = _merge_patch(old.get("trainingTriggers") or {}, wire)
        outcome.patch = {"trainingTriggers": patch, "conditions": conditions}
    old_cond: dict[str, Any] = next(
        (
            c
            for c in old.get("conditions") or []
            if c.get("type") == ConditionType.TRAINING_TRIGGERS
        ),
        {},
    )
    if readings.unsupported and old_cond.get("reason") != cond.reason:
        outcome.events.append(
            (EventReason.TRAINING_TRIGGER_NOT_SUPPORTED, readings.unsupported, True)
        )
    return outcome
