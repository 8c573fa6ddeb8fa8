"""One reconcile of one RecommenderSystem, as a linear pipeline of idempotent steps:

  parse spec -> find ScalingPolicy -> render -> ensure Pulsar topics -> apply children
  -> read readiness -> compute status

Each step that fails ends the pipeline with a False condition that says why;
nothing is applied for an invalid spec or a missing/exceeded policy, so a broken
manifest never leaves a partial set of children. The caller writes the returned
status once, and only when it differs from what is stored.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from recsys_contracts.field_issues import FieldIssue, InvalidResource, issues_from_validation_error
from recsys_operator.api.desired_model import serving_system
from recsys_operator.api.errors import (
    EngineNotServed,
    InvalidPolicy,
    InvalidSpec,
    PolicyViolation,
)
from recsys_operator.api.reasons import ConditionReason
from recsys_operator.api.resources import RecommenderSystem, ScalingPolicy
from recsys_operator.api.status import Condition, ConditionStatus, ConditionType
from recsys_operator.controller.conditions import condition, merge_conditions, summarize_ready
from recsys_operator.controller.kube import ApplyResult, KubeClient
from recsys_operator.controller.training_runs import latest_training_status
from recsys_operator.pulsar_admin import PartitionsDecreased, PulsarAdmin, PulsarAdminError
from recsys_operator.render import (
    PRUNED_FIRST_KINDS,
    PRUNED_KINDS,
    RenderOptions,
    render_system,
    topic_plan,
)
from recsys_operator.render.naming import (
    INSTANCE_LABEL,
    MANAGED_BY,
    Component,
    Track,
    child_name,
    serving_name,
)
from recsys_operator.render.serving import INFERENCE_PORT

log = logging.getLogger(__name__)

PulsarAdminFactory = Callable[[str, str | None], PulsarAdmin]


class SecretNotFound(LookupError):
    pass


@dataclass
class Outcome:
    """What one reconcile decided: the status to store, and what to tell the user."""

    status: dict[str, Any]
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    retry: bool = False  # a transient failure: reconcile again soon


def parse_system(body: dict[str, Any]) -> RecommenderSystem:
    clean: dict[str, Any] = {
        k: body[k] for k in ("apiVersion", "kind", "spec", "status") if k in body
    }
    meta = body.get("metadata", {})
    clean["metadata"] = {
        k: meta[k]
        for k in ("name", "namespace", "labels", "annotations", "generation", "uid")
        if k in meta
    }
    clean["metadata"]["labels"] = dict(meta.get("labels") or {})
    clean["metadata"]["annotations"] = dict(meta.get("annotations") or {})
    try:
        return RecommenderSystem.model_validate(clean)
    except ValidationError as exc:
        raise InvalidSpec("spec", issues_from_validation_error(exc)) from None


def children_selector(system: RecommenderSystem) -> str:
    """The label selector of every object this operator applies for `system`."""
    return f"{INSTANCE_LABEL}={system.metadata.name},app.kubernetes.io/managed-by={MANAGED_BY}"


def deployment_readiness(live: dict[str, Any] | None) -> tuple[bool, str]:
    """As `kubectl rollout status` judges it: observed, updated and ready at the desired count."""
    if live is None:
        return False, "not created"
    status = live.get("status") or {}
    generation = live.get("metadata", {}).get("generation", 0)
    if status.get("observedGeneration", 0) < generation:
        return False, "waiting for the deployment controller"
    want = (live.get("spec") or {}).get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    ready = status.get("readyReplicas", 0)
    if updated < want:
        return False, f"{updated}/{want} replicas updated"
    if ready < want:
        return False, f"{ready}/{want} replicas ready"
    return True, f"{ready}/{want} replicas ready"


class Reconciler:
    """Reconciles RecommenderSystems against one cluster and its Pulsar admin endpoints."""

    def __init__(
        self,
        kube: KubeClient,
        options: RenderOptions | None = None,
        pulsar_admin: PulsarAdminFactory = PulsarAdmin,
    ):
        self.kube = kube
        self.options = options or RenderOptions()
        self.pulsar_admin = pulsar_admin

    # --- steps --------------------------------------------------------------------

    def _policy(self, system: RecommenderSystem) -> ScalingPolicy | None:
        """The referenced policy (None when absent); raises InvalidPolicy when it is invalid."""
        ref = system.spec.scaling_policy_ref
        if ref is None:
            return None
        body = self.kube.get(
            system.api_version, "ScalingPolicy", system.metadata.namespace, ref.name
        )
        if body is None:
            return None
        try:
            return ScalingPolicy.model_validate(
                {"metadata": {"name": ref.name}, "spec": body.get("spec") or {}}
            )
        except ValidationError as exc:
            issues = issues_from_validation_error(exc)
            raise InvalidPolicy(
                f'ScalingPolicy "{ref.name}"',
                [
                    FieldIssue(
                        "spec.scalingPolicyRef.name",
                        f'ScalingPolicy "{ref.name}" is invalid: ' + "; ".join(map(str, issues)),
                    )
                ],
            ) from None

    def pulsar_token(self, system: RecommenderSystem) -> str | None:
        """The Pulsar token from spec.events.authSecretRef; raises SecretNotFound naming what is missing."""
        ref = system.spec.events.auth_secret_ref
        if ref is None:
            return None
        try:
            secret = self.kube.get("v1", "Secret", system.metadata.namespace, ref.name)
        except ApiException as exc:
            if exc.status != 403:
                raise
            # A cluster-wide install reads Secrets only in the namespaces its chart names.
            raise SecretNotFound(
                f'Secret "{ref.name}" (spec.events.authSecretRef): the operator may not read '
                f'Secrets in namespace "{system.metadata.namespace}" (forbidden); add it to '
                "the chart's secretNamespaces"
            ) from None
        if secret is None:
            raise SecretNotFound(f'Secret "{ref.name}" (spec.events.authSecretRef) not found')
        data = secret.get("data") or {}
        if ref.key not in data:
            raise SecretNotFound(
                f'Secret "{ref.name}" has no key "{ref.key}" (spec.events.authSecretRef.key)'
            )
        return base64.b64decode(data[ref.key]).decode().strip()

    async def _ensure_topics(
        self, system: RecommenderSystem, generation: int
    ) -> tuple[Condition, list[str]]:
        plan = topic_plan(system)
        try:
            token = await asyncio.to_thread(self.pulsar_token, system)
            async with self.pulsar_admin(system.spec.events.admin_url, token) as admin:
                changes = await admin.ensure_plan(plan)
        except SecretNotFound as exc:
            return condition(
                ConditionType.TOPICS_READY,
                False,
                ConditionReason.PULSAR_SECRET_NOT_FOUND,
                str(exc),
                generation,
            ), []
        except PartitionsDecreased as exc:
            reason = ConditionReason.TOPIC_PARTITIONS_DECREASED
            return condition(ConditionType.TOPICS_READY, False, reason, str(exc), generation), []
        except PulsarAdminError as exc:
            reason = {
                401: ConditionReason.PULSAR_UNAUTHORIZED,
                403: ConditionReason.PULSAR_FORBIDDEN,
            }.get(exc.status or 0, ConditionReason.PULSAR_ADMIN_FAILED)
            return condition(ConditionType.TOPICS_READY, False, reason, str(exc), generation), []
        names = ", ".join(plan.topic_url(t) for t in plan.topics)
        return condition(
            ConditionType.TOPICS_READY, True, ConditionReason.TOPICS_READY, names, generation
        ), changes

    def _sync(
        self, system: RecommenderSystem, objects: list[dict[str, Any]]
    ) -> tuple[dict[tuple[str, str], ApplyResult], list[str], list[str]]:
        """Apply the desired children and delete the owned ones no longer desired
        (a finished canary, an autoscaler of the other engine, a removed policy's PDBs);
        (applied, deleted, what the API server refused)."""
        synced = self.kube.sync(
            objects,
            children_selector(system),
            namespace=system.metadata.namespace,
            prune_kinds=PRUNED_KINDS,
            prune_first=PRUNED_FIRST_KINDS,
            owner_uid=system.metadata.uid or None,
        )
        return {(r.kind, r.name): r for r in synced.applied}, synced.deleted, synced.failed

    # --- the pipeline ---------------------------------------------------------------

    async def reconcile(self, body: dict[str, Any]) -> Outcome:
        generation = int(body.get("metadata", {}).get("generation") or 0)
        old_status = dict(body.get("status") or {})

        def finish(conditions: list[Condition], **status_fields: Any) -> dict[str, Any]:
            ready = summarize_ready(conditions, generation)
            status = {k: v for k, v in old_status.items() if k != "kopf"}
            status.update({k: v for k, v in status_fields.items() if v is not None})
            status["observedGeneration"] = generation
            status["conditions"] = merge_conditions(
                old_status.get("conditions", []), [ready, *conditions]
            )
            return status

        def blocked(reason: ConditionReason, message: str) -> Outcome:
            parts = [
                condition(t, False, reason, message, generation)
                for t in (
                    ConditionType.TOPICS_READY,
                    ConditionType.FEATURES_READY,
                    ConditionType.SERVING_READY,
                )
            ]
            return Outcome(finish(parts), warnings=[f"{reason}: {message}"])

        # 1. The spec, and the model served: an autoRollout candidate may stand in for spec.model.
        try:
            written = parse_system(body)
        except InvalidResource as exc:
            return blocked(ConditionReason.INVALID_SPEC, exc.summary)
        system = serving_system(written)

        # 2. The ScalingPolicy and 3. the desired objects (render checks the policy bounds).
        try:
            policy = await asyncio.to_thread(self._policy, system)
        except InvalidPolicy as exc:
            return blocked(ConditionReason.SCALING_POLICY_INVALID, exc.summary)
        ref = system.spec.scaling_policy_ref
        if ref is not None and policy is None:
            return blocked(
                ConditionReason.SCALING_POLICY_NOT_FOUND,
                f'ScalingPolicy "{ref.name}" not found in namespace {system.metadata.namespace}',
            )
        try:
            objects = render_system(system, policy, self.options)
        except PolicyViolation as exc:
            return blocked(ConditionReason.POLICY_VIOLATION, exc.summary)
        except EngineNotServed as exc:
            return blocked(ConditionReason.TRAINING_ENGINE_NOT_SERVED, exc.summary)
        except InvalidResource as exc:  # InvalidSpec: e.g. an archive URI a cluster cannot fetch
            return blocked(ConditionReason.INVALID_SPEC, exc.summary)

        # 4. Pulsar topics; a failure is reported but does not hold back the children.
        topics, topic_changes = await self._ensure_topics(system, generation)

        # 5. Children.
        results, removed, refused = await asyncio.to_thread(self._sync, system, objects)
        changes = (
            [f"Pulsar {c}" for c in topic_changes]
            + [str(r) for r in results.values() if r.action != "unchanged"]
            + removed
        )

        # 6. The last training run's verdict (new ones are announced in the Event).
        training = await asyncio.to_thread(latest_training_status, self.kube, written)
        if training is not None and training.last_run != (old_status.get("training") or {}).get(
            "lastRun"
        ):
            changes.append(
                f"training run {training.job}: {training.result.value} "
                f"(candidate {training.candidate_version}): {training.reason}"
            )

        # 7. Readiness.
        def ready_of(name: str) -> tuple[bool, str]:
            result = results.get(("Deployment", name))
            return deployment_readiness(result.live if result else None)

        # A refused child is its part's problem (the stream job's, else serving's): the
        # part is not ready, whatever the Deployments that did apply say.
        features_name = child_name(system, "features")
        features_refused = [r for r in refused if f"/{features_name}:" in r]
        serving_refused = [r for r in refused if r not in features_refused]

        def unless_refused(ready: Condition, kind: ConditionType, refusals: list[str]) -> Condition:
            if not refusals:
                return ready
            reason = ConditionReason.CHILD_APPLY_FAILED
            return condition(kind, False, reason, "; ".join(refusals), generation)

        features_ok, features_msg = ready_of(features_name)
        features = condition(
            ConditionType.FEATURES_READY,
            features_ok,
            (
                ConditionReason.DEPLOYMENT_AVAILABLE
                if features_ok
                else ConditionReason.DEPLOYMENT_NOT_READY
            ),
            f"stream job: {features_msg}",
            generation,
        )
        features = unless_refused(features, ConditionType.FEATURES_READY, features_refused)
        serving_parts = [(Component.GATEWAY, child_name(system, "gateway"))]
        serving_parts += [
            (f"serving {track}", serving_name(system, track))
            for track in (Track.STABLE, Track.CANARY)
            if ("Deployment", serving_name(system, track)) in results
        ]
        states = [(label, *ready_of(name)) for label, name in serving_parts]
        serving_ok = all(ok for _, ok, _ in states)
        serving = condition(
            ConditionType.SERVING_READY,
            serving_ok,
            (
                ConditionReason.DEPLOYMENT_AVAILABLE
                if serving_ok
                else ConditionReason.DEPLOYMENT_NOT_READY
            ),
            "; ".join(f"{label}: {msg}" for label, _, msg in states),
            generation,
        )
        serving = unless_refused(serving, ConditionType.SERVING_READY, serving_refused)

        namespace = system.metadata.namespace
        stable_version = old_status.get("stableVersion") or system.spec.model.version
        stable_archive = old_status.get("stableArchiveUri") or system.spec.model.archive_uri
        if system.spec.model.version == stable_version and not old_status.get("canary"):
            # The spec names the stable version: its archiveUri is the stable's (moved to a
            # new bucket, say). The stable is rendered from status once a rollout starts.
            stable_archive = system.spec.model.archive_uri or stable_archive
        status = finish(
            [topics, features, serving],
            stableVersion=stable_version,
            stableArchiveUri=stable_archive,
            training=training.to_wire() if training else None,
            endpoints={
                "gateway": f"http://{child_name(system, 'gateway')}.{namespace}.svc:80/v1/recommend",
                "serving": f"http://{serving_name(system, Track.STABLE)}.{namespace}.svc:{INFERENCE_PORT}",
            },
        )
        return Outcome(
            status,
            changes=changes,
            warnings=[f"{ConditionReason.CHILD_APPLY_FAILED}: {r}" for r in refused],
            retry=topics.status != ConditionStatus.TRUE or bool(refused),
        )
