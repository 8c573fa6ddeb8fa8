"""Status of the custom resources: Kubernetes-style conditions plus rollout state.

The rollout's whole state lives here (not in annotations), so an operator
restarted mid-rollout resumes at the same step with the same weight.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import Field

from recsys_contracts.api_base import ApiModel
from recsys_contracts.training_report import GateResult, PairedComparison
from recsys_operator.api.recommender_system import MAX_STEPS
from recsys_operator.api.trigger_status import TrainingTriggersStatus

# Conditions are a map keyed by type, so server-side apply merges them per type.
CONDITIONS_LIST_MAP: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


class ConditionType(StrEnum):
    READY = "Ready"
    TOPICS_READY = "TopicsReady"
    FEATURES_READY = "FeaturesReady"
    SERVING_READY = "ServingReady"
    ROLLOUT_HEALTHY = "RolloutHealthy"
    TRAINING_TRIGGERS = "TrainingTriggers"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


def rfc3339(moment: datetime) -> str:
    """`moment` as status writes times: UTC, whole seconds, `Z`."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_rfc3339(text: str) -> datetime:
    """A time as status or Kubernetes writes it (`Z` or an offset)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


class Condition(ApiModel):
    """One aspect of the resource's state, as in Kubernetes `metav1.Condition`."""

    type: str = Field(max_length=316)
    """Ready, TopicsReady, FeaturesReady, ServingReady, RolloutHealthy or TrainingTriggers."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = Field(pattern=REASON_PATTERN, max_length=1024)
    """A CamelCase word saying why, e.g. ScalingPolicyNotFound."""
    message: str = Field(default="", max_length=32768)
    """A human-readable explanation with the details."""
    observed_generation: int = Field(default=0, ge=0)
    """The metadata.generation this condition was computed from."""
    last_transition_time: str = Field(default_factory=now_rfc3339)
    """When status last changed (RFC 3339)."""


class AnalysisDecision(StrEnum):
    PASS = "Pass"
    FAIL = "Fail"
    INCONCLUSIVE = "Inconclusive"
    WAIT = "Wait"
    SAMPLE_RATIO_MISMATCH = "SampleRatioMismatch"


class GuardrailResult(ApiModel):
    """One guardrail rate (per impression) of the canary against stable's."""

    metric: str
    """dwell (seconds per impression) or purchase (purchases per impression)."""
    canary_rate: float
    """Canary rate over the window."""
    stable_rate: float
    """Stable rate over the window."""
    min_ratio: float
    """The threshold from the spec."""
    p_value: float
    """One-sided p-value that the canary rate is below minRatio x stable's."""


class AnalysisResult(ApiModel):
    """The numbers behind one rollout decision."""

    time: str
    """When the analysis ran (RFC 3339)."""
    decision: AnalysisDecision
    """Pass (advance), Fail (roll back), Inconclusive (hold), Wait (too few impressions) or SampleRatioMismatch (hold: the canary's share of traffic is off its weight)."""
    reason: str = ""
    """Why, in a sentence with the numbers."""
    canary_p99_ms: float | None = None
    """Canary p99 latency over the window."""
    stable_p99_ms: float | None = None
    """Stable p99 latency over the window."""
    canary_error_rate: float | None = None
    """Canary error rate over the window."""
    canary_ctr: float | None = None
    """Canary click-through rate over the window."""
    stable_ctr: float | None = None
    """Stable click-through rate over the window."""
    canary_impressions: int | None = None
    """Canary impressions in the window."""
    stable_impressions: int | None = None
    """Stable impressions in the window."""
    p_value: float | None = None
    """p-value of the one-sided test that canary CTR is below minCtrRatio x stable CTR."""
    alpha: float | None = None
    """Significance level of this look: its share of the rollout's budget 1 - confidence (a Fail needs pValue below it)."""
    ctr_std_error: float | None = None
    """Standard error of canary CTR - minCtrRatio x stable CTR, from the spread between user buckets."""
    impressions_needed: int | None = None
    """Impressions (both variants, at this weight) needed to detect a drop of minDetectableDrop with the configured power."""
    canary_share: float | None = None
    """Canary share of impressions in the window (the sample-ratio check compares it with the weight)."""
    sample_ratio_p_value: float | None = None
    """p-value of the sample-ratio check (chi-square of the canary share against the weight)."""
    guardrails: list[GuardrailResult] = Field(default_factory=list, max_length=8)
    """Dwell and purchase comparisons, when the spec sets their thresholds."""
    steps_combined: int | None = None
    """Steps whose windows this look combined (stratified by step); unset: this step's window only."""


class CanaryPhase(StrEnum):
    PRE_ROLLOUT = "PreRollout"
    SHADOW = "Shadow"
    PROGRESSING = "Progressing"
    AWAITING_PROMOTION = "AwaitingPromotion"
    PROMOTING = "Promoting"


class ShadowResult(ApiModel):
    """The numbers behind one judgement of the shadow phase."""

    time: str
    """When it was judged (RFC 3339)."""
    decision: AnalysisDecision
    """Pass (the canary gets its first step), Fail (roll back), Inconclusive or Wait (mirror for another duration)."""
    reason: str = ""
    """Why, in a sentence with the numbers."""
    compared: int | None = None
    """Mirrored requests answered by the canary and compared, in the window."""
    failed: int | None = None
    """Mirrored requests the canary failed to answer, in the window."""
    mean_overlap: float | None = None
    """Mean share of the stable's items the canary also recommended."""
    canary_predicted_ctr: float | None = None
    """Mean predicted CTR of the canary's lists."""
    stable_predicted_ctr: float | None = None
    """Mean predicted CTR of the stable's lists for the same requests."""


class WebhookResult(ApiModel):
    """The latest call of a rollout webhook."""

    name: str
    """The webhook's name in spec.rollout.webhooks."""
    type: str
    """pre-rollout, rollout or pre-promotion."""
    time: str
    """When it was called (RFC 3339)."""
    passed: bool
    """True for a 2xx answer."""
    status_code: int | None = None
    """The HTTP status, none when no answer came (timeout, refused connection)."""
    message: str = ""
    """What the webhook said (its body, shortened), or why the call failed."""
    failures: int = Field(default=0, ge=0)
    """Failed calls in a row of this webhook at this gate."""


class CanaryStatus(ApiModel):
    """The rollout in progress, if any."""

    version: str
    """Model version being rolled out."""
    weight: int = Field(default=0, ge=0, le=100)
    """Current share of traffic (percent) sent to the canary."""
    step: int = Field(default=0, ge=0)
    """Index into spec.rollout.steps."""
    step_started_at: str | None = None
    """When the current step began (RFC 3339)."""
    started_at: str | None = None
    """When the rollout began (RFC 3339)."""
    inconclusive_count: int = Field(default=0, ge=0)
    """Inconclusive analyses in a row at this step."""
    step_starts: list[str] = Field(default_factory=list, max_length=MAX_STEPS)
    """When each step so far began (RFC 3339), in order: step i's window runs to step i+1's start, and the analysis combines them all."""
    last_analysis: AnalysisResult | None = None
    """The latest analysis."""
    phase: CanaryPhase = CanaryPhase.PROGRESSING
    """PreRollout (pre-rollout webhooks, no traffic yet), Shadow (mirrored traffic only), Progressing (the steps), AwaitingPromotion (a person must confirm), Promoting (pre-promotion webhooks, then the stable scales up)."""
    gate_failures: int = Field(default=0, ge=0)
    """Failed webhook calls in a row at the current gate."""
    last_webhook: WebhookResult | None = None
    """The latest webhook call."""
    last_shadow: ShadowResult | None = None
    """The latest judgement of the shadow phase."""
    promotion_reason: str | None = None
    """While Promoting: why the canary is being promoted (its analysis, or a person)."""
    stable_replicas_target: int | None = Field(default=None, ge=1)
    """While Promoting: the replicas the stable must have ready before it takes all traffic."""


class RolloutOutcome(StrEnum):
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"
    ABORTED = "Aborted"


class RolloutRecord(ApiModel):
    """How the last finished rollout ended."""

    version: str
    """The model version that was rolled out."""
    outcome: RolloutOutcome
    """Promoted, RolledBack (analysis or deadline) or Aborted (by a person or a spec change)."""
    time: str
    """When it ended (RFC 3339)."""
    reason: str = ""
    """Why, with the numbers."""
    last_analysis: AnalysisResult | None = None
    """The analysis that decided it, if any."""


class RolloutActionResult(StrEnum):
    APPLIED = "Applied"
    IGNORED = "Ignored"
    REFUSED = "Refused"


class RolloutActionRecord(ApiModel):
    """The last `recsys.dev/rollout-action` the operator acted on (the annotation is
    removed once this is recorded)."""

    action: str = Field(max_length=63)
    """The value asked for: abort, promote, pause or resume (anything else is Refused)."""
    result: RolloutActionResult
    """Applied; Ignored (nothing it applies to, e.g. promote with no rollout); Refused (unknown value)."""
    message: str = ""
    """What the operator did about it."""
    time: str
    """When it was acted on (RFC 3339)."""


class RolloutCandidate(ApiModel):
    """A published candidate, and the spec it was published under."""

    version: str
    """The candidate's model version."""
    archive_uri: str
    """Its archive in the model store."""
    spec_model_version: str
    """spec.model.version when it passed. autoRollout serves the candidate while the spec still names this version; a person who changes spec.model.version takes over."""


class TrainingStatus(ApiModel):
    """The last finished training run, as its verdict says (the run's pod reports it)."""

    last_run: str
    """When the run finished (RFC 3339)."""
    job: str = ""
    """The pod that ran it (its logs hold the details)."""
    result: GateResult
    """Passed (the candidate is published), GatedOut (too little data or not better enough) or Failed."""
    reason: str = ""
    """Why, with the numbers."""
    candidate_version: str
    """The candidate's version (published only when Passed)."""
    stable_version: str | None = None
    """The version it was compared with."""
    metric: str = ""
    """The gate metric, e.g. ndcg@10."""
    candidate_score: float | None = None
    """The candidate's score on the newest held-out slice."""
    stable_score: float | None = None
    """The stable version's score on the same slice."""
    relative_improvement: float | None = None
    """candidate / stable - 1."""
    archive_uri: str | None = None
    """Where the published candidate lies (Passed only): what spec.model.archiveUri names to roll it out."""
    paired: PairedComparison | None = None
    """Candidate − stable user by user on the same slice, with its 95% interval (the gate asks for its low end above 0)."""
    rollout_candidate: RolloutCandidate | None = None
    """The newest candidate that passed since spec.model.version last changed: what spec.training.autoRollout serves. Kept when later runs are gated out or fail, so they never touch serving."""


class Endpoints(ApiModel):
    """Where to reach the system inside the cluster."""

    gateway: str | None = None
    """Gateway URL clients call."""
    serving: str | None = None
    """TorchServe inference URL."""


class RecommenderSystemStatus(ApiModel):
    """Observed state, written only by the operator."""

    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation last reconciled."""
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, json_schema_extra=CONDITIONS_LIST_MAP
    )
    """Ready, TopicsReady, FeaturesReady, ServingReady, RolloutHealthy."""
    stable_version: str | None = None
    """Model version serving the stable share of traffic."""
    stable_archive_uri: str | None = None
    """Archive of the stable version (the spec may already name the canary's)."""
    canary: CanaryStatus | None = None
    """The rollout in progress, if any."""
    last_rollout: RolloutRecord | None = None
    """How the previous rollout ended; a rolled-back version is not retried until the spec names another."""
    last_action: RolloutActionRecord | None = None
    """The last rollout action a person asked for and what came of it; an applied `pause` holds rollouts until `resume`."""
    endpoints: Endpoints | None = None
    """Service URLs."""
    training: TrainingStatus | None = None
    """The last finished training run (spec.training), from its verdict."""
    training_triggers: TrainingTriggersStatus | None = None
    """What spec.training.triggers measured, and the last run a trigger started."""
    kopf: dict[str, Any] | None = None
    """Handler progress of the operator framework (Kopf); internal."""


class ScalingPolicyStatus(ApiModel):
    """Observed state of a ScalingPolicy."""

    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation last reconciled."""
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, json_schema_extra=CONDITIONS_LIST_MAP
    )
    """Ready (the policy is valid)."""
    kopf: dict[str, Any] | None = None
    """Handler progress of the operator framework (Kopf); internal."""
