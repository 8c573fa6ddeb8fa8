"""Every reason the operator writes: condition reasons and Kubernetes Event reasons.

One place, as KEDA keeps its `eventreason` constants, so that dashboards, alerts
and the Argo CD health script (charts/recsys-operator/argocd/, tested against
`PERMANENT_REASONS`) can rely on a closed set of CamelCase words.
"""

from __future__ import annotations

from enum import StrEnum


class ConditionReason(StrEnum):
    """The `reason` of a status condition (`status.conditions[].reason`)."""

    # Ready (a summary: otherwise the first failing part's reason).
    ALL_COMPONENTS_READY = "AllComponentsReady"
    # Blocking: nothing is applied (see BLOCKING_REASONS).
    INVALID_SPEC = "InvalidSpec"
    SCALING_POLICY_NOT_FOUND = "ScalingPolicyNotFound"
    SCALING_POLICY_INVALID = "ScalingPolicyInvalid"
    POLICY_VIOLATION = "PolicyViolation"
    TRAINING_ENGINE_NOT_SERVED = "TrainingEngineNotServed"
    # TopicsReady.
    TOPICS_READY = "TopicsReady"
    PULSAR_SECRET_NOT_FOUND = "PulsarSecretNotFound"
    PULSAR_UNAUTHORIZED = "PulsarUnauthorized"
    PULSAR_FORBIDDEN = "PulsarForbidden"
    PULSAR_ADMIN_FAILED = "PulsarAdminFailed"
    TOPIC_PARTITIONS_DECREASED = "TopicPartitionsDecreased"
    # FeaturesReady and ServingReady.
    DEPLOYMENT_AVAILABLE = "DeploymentAvailable"
    DEPLOYMENT_NOT_READY = "DeploymentNotReady"
    # The API server refused a child. Not blocking: a rollout whose canary cannot be
    # created must still reach its progressDeadline or inconclusive limit and roll back.
    CHILD_APPLY_FAILED = "ChildApplyFailed"
    # A ScalingPolicy's Ready.
    VALID = "Valid"
    # RolloutHealthy (the rollout state machine's Health).
    STABLE = "Stable"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    PROMOTED = "Promoted"
    ABORTED = "Aborted"
    ROLLED_BACK = "RolledBack"
    PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
    ANALYSIS_FAILED = "AnalysisFailed"
    # Rollout gates (docs/concepts.md "Gates").
    PRE_ROLLOUT = "PreRollout"
    SHADOW = "Shadow"
    SHADOW_FAILED = "ShadowFailed"
    WEBHOOK_RETRYING = "WebhookRetrying"
    WEBHOOK_FAILED = "WebhookFailed"
    AWAITING_PROMOTION = "AwaitingPromotion"
    PROMOTING = "Promoting"
    SCALING_UP_STABLE = "ScalingUpStable"
    # TrainingTriggers (spec.training.triggers).
    TRIGGERS_WATCHING = "Watching"
    TRIGGER_METRICS_MISSING = "MetricsMissing"
    DRIFT_SOURCE_NOT_SUPPORTED = "DriftSourceNotSupported"


class EventReason(StrEnum):
    """The `reason` of a Kubernetes Event the operator posts on a resource."""

    APPLIED = "Applied"
    RECONCILE_FAILED = "ReconcileFailed"
    TOPICS_KEPT = "TopicsKept"
    TOPICS_DELETED = "TopicsDeleted"
    TOPICS_LEFT_BEHIND = "TopicsLeftBehind"  # deletionPolicy Delete, but they could not be
    # Rollout decisions (also the `reason` label of the rollout-decisions metric).
    ROLLOUT_STARTED = "RolloutStarted"
    ROLLOUT_ADVANCED = "RolloutAdvanced"
    ROLLOUT_PROMOTED = "RolloutPromoted"
    ROLLOUT_ABORTED = "RolloutAborted"
    ROLLED_BACK = "RolledBack"
    ANALYSIS_FAILED = "AnalysisFailed"
    ANALYSIS_INCONCLUSIVE = "AnalysisInconclusive"  # f"Analysis{decision}" in the state machine
    ANALYSIS_WAIT = "AnalysisWait"
    ANALYSIS_SAMPLE_RATIO_MISMATCH = "AnalysisSampleRatioMismatch"
    # Rollout gates.
    WEBHOOK_FAILED = "WebhookFailed"
    SHADOW_PASSED = "ShadowPassed"
    AWAITING_PROMOTION = "AwaitingPromotion"
    SCALING_UP_STABLE = "ScalingUpStable"
    # A person's recsys.dev/rollout-action, acknowledged (status.lastAction says the same).
    ROLLOUT_ACTION_APPLIED = "RolloutActionApplied"
    ROLLOUT_ACTION_IGNORED = "RolloutActionIgnored"
    ROLLOUT_ACTION_REFUSED = "RolloutActionRefused"
    # spec.training.triggers: a trigger fired and started a training run.
    TRAINING_TRIGGERED = "TrainingTriggered"
    TRAINING_TRIGGER_NOT_SUPPORTED = "TrainingTriggerNotSupported"


# Reasons for which the reconcile applies nothing, so a rollout must not move traffic.
BLOCKING_REASONS = frozenset(
    {
        ConditionReason.INVALID_SPEC,
        ConditionReason.SCALING_POLICY_NOT_FOUND,
        ConditionReason.SCALING_POLICY_INVALID,
        ConditionReason.POLICY_VIOLATION,
        ConditionReason.TRAINING_ENGINE_NOT_SERVED,
    }
)

# A False Ready with one of these is a problem that waiting will not fix: Argo CD shows
# the system Degraded rather than Progressing (the health script lists the same words).
PERMANENT_REASONS = frozenset(
    {
        ConditionReason.INVALID_SPEC,
        ConditionReason.SCALING_POLICY_NOT_FOUND,
        ConditionReason.SCALING_POLICY_INVALID,
        ConditionReason.POLICY_VIOLATION,
        ConditionReason.TRAINING_ENGINE_NOT_SERVED,
        ConditionReason.PULSAR_UNAUTHORIZED,
        ConditionReason.PULSAR_FORBIDDEN,
        ConditionReason.TOPIC_PARTITIONS_DECREASED,
    }
)
