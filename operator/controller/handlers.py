"""Kopf handlers: when to reconcile, and recording the outcome.

Every trigger — the resource created, its spec changed, the operator resumed,
a periodic resync, a child changed or deleted, its ScalingPolicy changed — runs
the same `Reconciler.reconcile` under a per-resource lock, then writes status
once (and only if it changed) and posts an Event per change or problem.
Kopf keeps its own bookkeeping in `status.kopf`, never in annotations.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, cast

import kopf
from kubernetes import config as kube_config
from pydantic import ValidationError

from recsys_contracts import feature_keys
from recsys_contracts.env_vars import OperatorEnv
from recsys_contracts.field_issues import InvalidResource, issues_from_validation_error
from recsys_operator.api.base import GROUP, VERSION
from recsys_operator.api.reasons import ConditionReason, EventReason
from recsys_operator.api.recommender_system import EventsSpec, RecommenderSystemSpec
from recsys_operator.api.resources import ObjectMeta, RecommenderSystem, ScalingPolicy
from recsys_operator.api.status import ConditionType
from recsys_operator.controller import metrics
from recsys_operator.controller.conditions import condition, merge_conditions
from recsys_operator.controller.kube import KNOWN_KINDS, KubeClient
from recsys_operator.controller.reconcile import Outcome, Reconciler, SecretNotFound, parse_system
from recsys_operator.controller.rollout_driver import (
    ACTION_ANNOTATION,
    cluster_replicas,
    rollout_tick,
)
from recsys_operator.controller.training_triggers import evaluate_triggers
from recsys_operator.pulsar_admin import PulsarAdmin, PulsarAdminError
from recsys_operator.render import CHILD_KINDS, RenderOptions, TopicPlan, topic_plan
from recsys_operator.render.naming import INSTANCE_LABEL, MANAGED_BY
from recsys_operator.render.ray_training import RAY_API_VERSION, RAY_GROUP, RAY_SCHEDULE_KIND
from recsys_operator.rollout.state_machine import AnalysisSource, ShadowSource

log = logging.getLogger(__name__)

RECSYS = (GROUP, VERSION, "recommendersystems")
POLICIES = (GROUP, VERSION, "scalingpolicies")
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
API_VERSION = f"{GROUP}/{VERSION}"

# How often every system is reconciled even when nothing announced a change.
RESYNC_SECONDS = float(os.environ.get(OperatorEnv.RESYNC_SECONDS, "60"))


class State:
    """What the handlers share, set up once at start-up."""

    reconciler: Reconciler
    kube: KubeClient
    locks: dict[tuple[str, str], asyncio.Lock]
    queued: set[tuple[str, str]]  # systems with a reconcile waiting for their lock
    executor: ThreadPoolExecutor
    # Where rollout analyses come from; None: Prometheus at the configured URL.
    # (Tests of the Kubernetes side, where no gateway runs, plug in their own.)
    analysis_source: Callable[[dict[str, Any]], AnalysisSource] | None = None
    shadow_source: Callable[[dict[str, Any]], ShadowSource] | None = None


STATE = State()


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
        field="status.kopf.lastHandled"
    )
    # Kopf's own per-handler Events ("Handler ... succeeded", every timer run) only for
    # problems: the operator posts its own, one per change, and none at steady state.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 8
    # A deleted system waits for its timers to finish their current tick: check every
    # second rather than Kopf's default minute, so deletion is not held up.
    settings.background.cancellation_polling = 1
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        # The client captures $KUBECONFIG at import; read it now, as a user expects.
        kube_config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    STATE.kube = KubeClient()
    STATE.reconciler = Reconciler(STATE.kube, options=_discover_options(STATE.kube))
    STATE.locks = {}
    STATE.queued = set()
    # Kubernetes calls run in threads (the client is synchronous): our own pool, so that
    # stopping can drop calls still queued instead of waiting for each of them.
    STATE.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kube")
    asyncio.get_running_loop().set_default_executor(STATE.executor)


@kopf.on.cleanup()
async def stop(**_: Any) -> None:
    STATE.executor.shutdown(wait=False, cancel_futures=True)


def _discover_options(kube: KubeClient) -> RenderOptions:
    """Which optional APIs the cluster serves (KEDA, Prometheus Operator, KubeRay)."""
    served: set[str] = set()
    ray_kinds: set[str] = set()
    try:
        served = kube.served_api_groups()
        if RAY_GROUP in served:  # RayCronJob came with KubeRay 1.6: ask for the kind
            ray_kinds = kube.served_kinds(RAY_API_VERSION)
    except Exception as exc:  # discovery is best effort; the defaults are safe
        log.warning(
            "API discovery failed (%s); assuming no KEDA, Prometheus Operator or KubeRay", exc
        )
    return RenderOptions(
        monitoring="monitoring.coreos.com" in served,
        keda="keda.sh" in served,
        ray=RAY_SCHEDULE_KIND in ray_kinds,
        prometheus_url=os.environ.get(OperatorEnv.PROMETHEUS_URL, RenderOptions.prometheus_url),
        prometheus_namespace=os.environ.get(OperatorEnv.PROMETHEUS_NAMESPACE) or None,
    )


def post_event(body: dict[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
    """A Kubernetes Event on the resource (Kopf posts it in the background)."""
    kopf.event(
        cast(kopf.Body, body),
        type="Warning" if warning else "Normal",
        reason=reason,
        message=message,
    )


async def write_status(kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
    """Merge-patch the status subresource of one of our resources."""
    await asyncio.to_thread(
        STATE.kube.merge_patch, API_VERSION, kind, namespace, name, {"status": status}, "status"
    )


# --- reconcile and record ---------------------------------------------------------


def _without_kopf(status: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k != "kopf"}


async def reconcile_and_record(namespace: str, name: str, trigger: str) -> Outcome | None:
    """Reconcile one system from its freshest body; write status only when it changed."""
    key = (namespace, name)
    if key in STATE.queued:
        # A reconcile is already waiting for the lock; it will read the freshest state,
        # so a burst of triggers (e.g. many child events) costs one reconcile, not many.
        return None
    STATE.queued.add(key)
    lock = STATE.locks.setdefault(key, asyncio.Lock())
    async with lock:
        STATE.queued.discard(key)
        body = await asyncio.to_thread(
            STATE.kube.get, API_VERSION, "RecommenderSystem", namespace, name
        )
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        started = time.perf_counter()
        metrics.RECONCILES.labels(trigger=trigger).inc()
        try:
            outcome = await STATE.reconciler.reconcile(body)
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
        finally:
            metrics.RECONCILE_DURATION.observe(time.perf_counter() - started)
        old = _without_kopf(body.get("status") or {})
        changed = outcome.status != old
        if changed:
            await write_status("RecommenderSystem", namespace, name, outcome.status)
        if outcome.changes:  # one Event per reconcile that changed something, not per child
            post_event(body, EventReason.APPLIED, summarize_changes(outcome.changes))
        if changed:
            # A system blocked for the same reason stores the same status at every resync:
            # warn when it becomes blocked (or the reason changes), not once a minute.
            for warning in outcome.warnings:
                post_event(body, EventReason.RECONCILE_FAILED, warning, warning=True)
        return outcome


EVENT_MESSAGE_LIMIT = 1024  # the API server truncates longer Event messages


def summarize_changes(changes: list[str]) -> str:
    """`created Deployment/x, ...` in one Event message, cut to what an Event holds."""
    text = f"{len(changes)} change(s): " + "; ".join(changes)
    if len(text) <= EVENT_MESSAGE_LIMIT:
        return text
    return text[: EVENT_MESSAGE_LIMIT - 4] + " ..."


RETRY_FIRST_DELAY_S = 10.0
RETRY_MAX_DELAY_S = 300.0
"""A system waiting for a dependency (a missing Secret, Pulsar down) is retried after
10 s, 20 s, 40 s ... up to 5 min: each Kopf retry writes its progress to status, so a
fixed 10 s cost 12 writes a minute for as long as the Secret was missing. The resync
timer (RESYNC_SECONDS) still reconciles in between and clears the condition as soon
as the dependency is there; our own status is written only when it changes."""


def retry_delay(retries: int) -> float:
    """Seconds before retry number `retries` + 1 (Kopf's `retry`: 0 on the first run)."""
    return min(RETRY_FIRST_DELAY_S * 2 ** min(retries, 32), RETRY_MAX_DELAY_S)


@kopf.on.resume(*RECSYS)
@kopf.on.create(*RECSYS)
@kopf.on.update(*RECSYS, field="spec")
async def reconcile_system(
    namespace: str | None, name: str, reason: str, retry: int, **_: Any
) -> None:
    assert namespace is not None  # RecommenderSystems are namespaced
    outcome = await reconcile_and_record(namespace, name, trigger=str(reason))
    if outcome is not None and outcome.retry:
        raise kopf.TemporaryError(
            "a dependency is not ready yet; retrying", delay=retry_delay(retry)
        )


@kopf.timer(*RECSYS, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
async def resync_system(namespace: str | None, name: str, **_: Any) -> None:
    assert namespace is not None
    await reconcile_and_record(namespace, name, trigger="resync")


async def _on_child_event(
    type: str, namespace: str | None, labels: Mapping[str, str], **_: Any
) -> None:
    """A child changed or vanished: reconcile its owner so hand edits are put back at once."""
    owner = labels.get(INSTANCE_LABEL)
    if owner and namespace and type in ("MODIFIED", "DELETED"):
        await reconcile_and_record(namespace, owner, trigger="child")


# Every kind the operator owns, so a hand edit of a PDB or a ScaledObject is put back at
# once, not at the next resync. Kinds a cluster does not serve (no KEDA) are not watched.
for _api_version, _kind in CHILD_KINDS:
    _group, _, _version = _api_version.rpartition("/")
    _plural = KNOWN_KINDS[(_api_version, _kind)][0]
    kopf.on.event(_group, _version, _plural, labels=MANAGED, id=f"child-{_plural}")(_on_child_event)


TOPIC_DELETION_DEADLINE_S = 600.0
"""How long the finalizer retries deleting a system's topics (deletionPolicy Delete)
while Pulsar's admin API fails, before it lets the system go with a TopicsLeftBehind
Warning that names them: a finalizer that waits forever on a broken dependency holds up
`kubectl delete`, Argo CD's prune and the deletion of the whole namespace."""
TOPIC_DELETION_RETRY_S = 30.0


@kopf.on.delete(*RECSYS)
async def delete_system(
    body: kopf.Body, namespace: str | None, runtime: timedelta, **_: Any
) -> None:
    """The finalizer: delete or keep the Pulsar topics as spec.events.deletionPolicy says.

    Children are owned (ownerReferences), so Kubernetes garbage-collects them.
    """
    try:
        system = parse_system(dict(body))
    except InvalidResource as exc:
        # The CRD admits a few things the models refuse (requests above limits): a spec
        # edited that way after its topics were made still names them in spec.events.
        events_only = _events_only(dict(body))
        if events_only is None:
            post_event(
                dict(body),
                EventReason.TOPICS_KEPT,
                f"spec.events invalid ({exc}); topics, if any, kept",
                warning=True,
            )
            return
        system = events_only
    plan = topic_plan(system)
    assert namespace is not None
    # Wait for an in-flight reconcile (it may be creating topics); later ones see the deletion.
    async with STATE.locks.setdefault((namespace, str(body["metadata"]["name"])), asyncio.Lock()):
        await _delete_topics(body, system, plan, runtime.total_seconds())


def _events_only(body: dict[str, Any]) -> RecommenderSystem | None:
    """The system as far as its topics go (metadata and spec.events), or None when
    spec.events itself is invalid."""
    try:
        events = EventsSpec.model_validate((body.get("spec") or {}).get("events") or {})
    except ValidationError:
        return None
    meta = body.get("metadata") or {}
    # Unvalidated on purpose: only metadata and spec.events are read (topic_plan, the token).
    spec = RecommenderSystemSpec.model_construct(events=events)  # type: ignore[call-arg]
    return RecommenderSystem.model_construct(
        metadata=ObjectMeta(name=meta.get("name"), namespace=meta.get("namespace")), spec=spec
    )


def _systems_sharing_topics(body: kopf.Body, plan: TopicPlan) -> list[str]:
    """The other systems of the namespace, not being deleted themselves, whose
    spec.events names the same Pulsar tenant and namespace: their topics are these."""
    namespace, name = body["metadata"].get("namespace"), body["metadata"]["name"]
    others = STATE.kube.list_objects(API_VERSION, "RecommenderSystem", namespace)
    sharing = []
    for other in others:
        meta = other["metadata"]
        if meta["name"] == name or meta.get("deletionTimestamp"):
            continue  # systems deleted together (their namespace) delete the topics
        stand_in = _events_only(other)
        if stand_in is None:
            continue
        theirs = topic_plan(stand_in)
        if (theirs.tenant, theirs.namespace) == (plan.tenant, plan.namespace):
            sharing.append(str(meta["name"]))
    return sorted(sharing)


async def _delete_topics(
    body: kopf.Body, system: RecommenderSystem, plan: TopicPlan, waited_s: float
) -> None:
    if system.spec.events.deletion_policy != "Delete":
        post_event(
            dict(body),
            EventReason.TOPICS_KEPT,
            f"deletionPolicy Keep: topics of {plan.tenant}/{plan.namespace} kept",
        )
        return

    sharing = await asyncio.to_thread(_systems_sharing_topics, body, plan)
    if sharing:
        post_event(
            dict(body),
            EventReason.TOPICS_KEPT,
            f"topics of {plan.tenant}/{plan.namespace} kept: RecommenderSystem "
            f"{', '.join(sharing)} uses them too (spec.events.namespace)",
        )
        return

    def left_behind(why: str) -> None:
        topics = ", ".join(plan.topic_url(t) for t in plan.topics)
        message = f"could not delete the topics ({why}); left in Pulsar: {topics}"
        post_event(dict(body), EventReason.TOPICS_LEFT_BEHIND, message, warning=True)

    try:
        token = await asyncio.to_thread(STATE.reconciler.pulsar_token, system)
    except SecretNotFound as exc:
        # Deleted with the system (one `kubectl delete -f`, or its namespace): no retry
        # brings it back.
        left_behind(str(exc))
        return
    try:
        async with PulsarAdmin(system.spec.events.admin_url, token) as admin:
            deleted = await admin.delete_plan(plan)
    except PulsarAdminError as exc:
        remaining = TOPIC_DELETION_DEADLINE_S - waited_s
        if exc.status in (401, 403) or remaining <= 0:  # refused, or still failing
            left_behind(str(exc))
            return
        raise kopf.TemporaryError(
            f"could not delete topics: {exc}", delay=min(TOPIC_DELETION_RETRY_S, remaining)
        ) from exc
    post_event(
        dict(body),
        EventReason.TOPICS_DELETED,
        f"deleted {', '.join(deleted) or 'nothing (already gone)'}",
    )


# --- rollouts ---------------------------------------------------------------------

ROLLOUT_TICK_SECONDS = float(os.environ.get(OperatorEnv.ROLLOUT_TICK_SECONDS, "10"))


@kopf.timer(*RECSYS, interval=ROLLOUT_TICK_SECONDS, initial_delay=ROLLOUT_TICK_SECONDS / 2)
async def drive_rollout(namespace: str | None, name: str, **_: Any) -> None:
    """Advance, hold, promote or roll back the system's rollout; then apply the new traffic split."""
    assert namespace is not None
    key = (namespace, name)
    async with STATE.locks.setdefault(key, asyncio.Lock()):
        body = await asyncio.to_thread(
            STATE.kube.get, API_VERSION, "RecommenderSystem", namespace, name
        )
        if body is None or body["metadata"].get("deletionTimestamp") or not body.get("status"):
            return  # not reconciled yet: the first reconcile records the stable version
        source = STATE.analysis_source(body) if STATE.analysis_source else None
        try:
            replicas = cluster_replicas(STATE.kube, parse_system(body))
        except InvalidResource:
            replicas = None  # rollout_tick leaves invalid specs to the reconcile
        shadow = STATE.shadow_source(body) if STATE.shadow_source else None
        patch, transition = await rollout_tick(
            body,
            STATE.reconciler.options.prometheus_url,
            source=source,
            replicas=replicas,
            shadow=shadow,
        )
        if transition is None:
            return
        if patch is not None:
            await write_status("RecommenderSystem", namespace, name, patch)
        for event in transition.events:
            post_event(body, event.reason, event.message, warning=event.warning)
            metrics.ROLLOUT_DECISIONS.labels(reason=event.reason).inc()
        if transition.action is not None:
            # Only now that status.lastAction and the Event say what came of it.
            await asyncio.to_thread(
                STATE.kube.merge_patch,
                API_VERSION,
                "RecommenderSystem",
                namespace,
                name,
                {"metadata": {"annotations": {ACTION_ANNOTATION: None}}},
            )
    if patch is not None:
        await reconcile_and_record(namespace, name, trigger="rollout")


# --- retraining triggers ----------------------------------------------------------

TRIGGER_TICK_SECONDS = float(os.environ.get(OperatorEnv.TRIGGER_TICK_SECONDS, "60"))


@kopf.timer(*RECSYS, interval=TRIGGER_TICK_SECONDS, initial_delay=TRIGGER_TICK_SECONDS)
async def watch_training_triggers(namespace: str | None, name: str, **_: Any) -> None:
    """Evaluate spec.training.triggers; a trigger that fires may start a training Job."""
    assert namespace is not None
    async with STATE.locks.setdefault((namespace, name), asyncio.Lock()):
        body = await asyncio.to_thread(
            STATE.kube.get, API_VERSION, "RecommenderSystem", namespace, name
        )
        if body is None or body["metadata"].get("deletionTimestamp") or not body.get("status"):
            return  # not reconciled yet: no CronJob to start a run from
        outcome = await evaluate_triggers(STATE.kube, body, STATE.reconciler.options.prometheus_url)
        drift = outcome.drift  # what the drift alert compares; none: the series goes
        metrics.record_drift(
            feature_keys.system_id(namespace, name),
            (drift.source, drift.test) if drift is not None else None,
            drift.value if drift is not None else None,
        )
        if outcome.patch is not None:
            await write_status("RecommenderSystem", namespace, name, outcome.patch)
        for reason, message, warning in outcome.events:
            post_event(body, reason, message, warning=warning)


# --- ScalingPolicy ----------------------------------------------------------------


@kopf.on.resume(*POLICIES)
@kopf.on.create(*POLICIES)
@kopf.on.update(*POLICIES, field="spec")
async def reconcile_policy(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> None:
    """Validate the policy into its Ready condition, then re-check every system using it."""
    assert namespace is not None
    generation = int(body.get("metadata", {}).get("generation") or 0)
    try:
        ScalingPolicy.model_validate(
            {"metadata": {"name": name}, "spec": dict(body.get("spec") or {})}
        )
        ready = condition(
            ConditionType.READY, True, ConditionReason.VALID, "policy is valid", generation
        )
    except ValidationError as exc:
        summary = "; ".join(str(i) for i in issues_from_validation_error(exc))
        ready = condition(
            ConditionType.READY, False, ConditionReason.INVALID_SPEC, summary, generation
        )
    old = dict(body.get("status") or {})
    status = {
        "observedGeneration": generation,
        "conditions": merge_conditions(old.get("conditions", []), [ready]),
    }
    if status != _without_kopf(old):
        await write_status("ScalingPolicy", namespace, name, status)
    await _reconcile_users(namespace, name)


@kopf.on.event(*POLICIES, id="policy-deleted")
async def policy_deleted(type: str, namespace: str | None, name: str, **_: Any) -> None:
    """A deleted policy: its systems say ScalingPolicyNotFound now, not at the next resync
    (a watch event: no finalizer, so deleting a policy never waits on the operator)."""
    if type == "DELETED" and namespace is not None:
        await _reconcile_users(namespace, name)


async def _reconcile_users(namespace: str, policy: str) -> None:
    """Reconcile every system of `namespace` whose spec.scalingPolicyRef names `policy`.
    One system's failure (a transient API error) does not keep the policy's change from
    the systems after it: each is tried, then the handler fails for Kopf to retry."""
    systems = await asyncio.to_thread(
        STATE.kube.list_objects, API_VERSION, "RecommenderSystem", namespace
    )
    failed = []
    for system in systems:
        if ((system.get("spec") or {}).get("scalingPolicyRef") or {}).get("name") != policy:
            continue
        name = system["metadata"]["name"]
        try:
            await reconcile_and_record(namespace, name, trigger="policy")
        except Exception as exc:
            log.warning("reconciling %s/%s for policy %s failed: %s", namespace, name, policy, exc)
            failed.append(name)
    if failed:
        raise kopf.TemporaryError(
            f"systems not reconciled after the policy changed: {', '.join(failed)}", delay=10
        )
