"""The `RecommenderSystem` spec: what an ML team declares.

Every field carries its documentation as an attribute docstring; the CRD in
`crds/`, the API reference in `docs/` and the examples are derived from, or
checked against, these models.
"""

from __future__ import annotations

import itertools
from enum import StrEnum
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, field_validator, model_validator

from recsys_contracts.api_base import (
    ApiModel,
    DnsLabel,
    Duration,
    Quantity,
    field_error,
    parse_duration,
    quantity_value,
)
from recsys_contracts.feature_job_settings import SubscriptionType
from recsys_contracts.index_spec import IndexSpec, index_fit_problems
from recsys_contracts.model_version import MODEL_VERSION_PATTERN
from recsys_contracts.store_endpoint import URL_PATTERN, StoreMode, endpoint_problem
from recsys_operator.api import cel

if TYPE_CHECKING:
    from recsys_operator.api.training import TrainingSpec

GPU_RESOURCE = "nvidia.com/gpu"
PULSAR_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
ARCHIVE_URI_PATTERN = r"^(https?://|s3://|pvc://|file://).+"


# --- events -----------------------------------------------------------------------


def url_host_problem(url: str) -> str | None:
    """Why `url` names no host and port a client could connect to, or None."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port out of range
    except ValueError as exc:
        return f"{url!r} is not a usable URL: {exc}"
    if not parts.hostname:
        return f"{url!r} names no host"
    if port == 0:
        return f"{url!r} names port 0"
    return None


class DeletionPolicy(StrEnum):
    KEEP = "Keep"
    DELETE = "Delete"


class SecretKeyRef(ApiModel):
    """A key inside a Secret in the resource's namespace."""

    name: DnsLabel
    """Name of the Secret."""
    key: str = Field(default="token", min_length=1)
    """Key inside the Secret whose value is used."""


class TopicSpec(ApiModel):
    """One Pulsar topic the operator creates and owns."""

    model_config = ConfigDict(
        json_schema_extra=cel.rules(
            cel.rule(
                "(self.retentionMinutes == 0) == (self.retentionSizeMb == 0)",
                "retentionMinutes and retentionSizeMb are both 0 (no retention) or both non-zero",
                ".retentionMinutes",
            ),
            cel.rule(
                "self.retentionSizeMb <= 0 || self.backlogQuotaMb < self.retentionSizeMb",
                "backlogQuotaMb must be below retentionSizeMb",
                ".backlogQuotaMb",
            ),
        )
    )

    partitions: int = Field(default=4, ge=1, le=1024)
    """Number of partitions; events are keyed by user id, so one user's events stay in order."""
    retention_minutes: int = Field(default=1440, ge=-1)
    """How long acknowledged messages are kept (-1 keeps them forever, 0 keeps none)."""
    retention_size_mb: int = Field(default=1024, ge=-1)
    """How many megabytes of acknowledged messages are kept per topic (-1: no limit)."""
    backlog_quota_mb: int = Field(default=512, ge=1)
    """Unacknowledged backlog allowed before producers are held back (producer_request_hold); below retentionSizeMb."""

    @model_validator(mode="after")
    def _pulsar_accepts(self) -> Self:
        # Pulsar's own rules (AdminResource.checkBacklogQuota, RetentionPolicies checks):
        if (self.retention_minutes == 0) != (self.retention_size_mb == 0):
            raise field_error(
                "retentionMinutes",
                "retentionMinutes and retentionSizeMb are both 0 (no retention) or both non-zero; use -1 for no limit",
            )
        if self.retention_size_mb > 0 and self.backlog_quota_mb >= self.retention_size_mb:
            raise field_error(
                "backlogQuotaMb",
                f"backlogQuotaMb {self.backlog_quota_mb} must be below retentionSizeMb {self.retention_size_mb}",
            )
        return self


class TopicsSpec(ApiModel):
    """The topics of one RecommenderSystem, under `persistent://TENANT/NAMESPACE/`."""

    interactions: TopicSpec = Field(default_factory=TopicSpec)
    """User interactions (view, click, purchase, dwell) sent by clients through the gateway."""
    impressions: TopicSpec = Field(default_factory=TopicSpec)
    """One event per recommendation served: what was shown, to whom, by which model version."""
    dead_letter: TopicSpec = Field(default_factory=lambda: TopicSpec(partitions=1))
    """Events that could not be processed, each with the reason; never dropped silently."""


class EventsSpec(ApiModel):
    """Where user events flow: a Pulsar cluster, a tenant and namespace, and the topics."""

    service_url: str = Field(
        default="pulsar://pulsar-broker.pulsar:6650", pattern=r"^pulsar(\+ssl)?://.+"
    )
    """Pulsar binary protocol URL used by producers and consumers."""
    admin_url: str = Field(default="http://pulsar-broker.pulsar:8080", pattern=r"^https?://.+")
    """Pulsar admin REST API URL used by the operator to create topics."""
    auth_secret_ref: SecretKeyRef | None = None
    """Secret holding a Pulsar JWT token; omit when the cluster has no authentication."""
    tenant: str = Field(default="recsys", pattern=PULSAR_NAME_PATTERN)
    """Pulsar tenant; created when missing."""
    namespace: str | None = Field(default=None, pattern=PULSAR_NAME_PATTERN)
    """Pulsar namespace; defaults to `<kubernetes-namespace>-<name>` so systems never share topics."""
    subscription_type: SubscriptionType = SubscriptionType.KEY_SHARED
    """Subscription type of the stream jobs: KeyShared or Failover keep per-user order; Shared does not."""
    deletion_policy: DeletionPolicy = DeletionPolicy.KEEP
    """What happens to the topics when the RecommenderSystem is deleted. Delete keeps them while another RecommenderSystem of the same Kubernetes namespace names the same Pulsar tenant and namespace (systems in other Kubernetes namespaces are not checked)."""
    topics: TopicsSpec = Field(default_factory=TopicsSpec)
    """Per-topic partitions, retention and backlog quota."""

    @field_validator("admin_url")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        # The pattern admits what the operator's HTTP client cannot send a request to (no
        # host, a port past 65535, a broken IPv6 literal, several hosts). serviceUrl may
        # list several hosts (pulsar://h1:6650,h2:6650): the Pulsar clients take that.
        problem = url_host_problem(value)
        if problem:
            raise ValueError(problem)
        return value


# The CEL twin of `endpoint_problem` for mode cluster: no unix socket, no database but 0.
CLUSTER_URL_CEL = "^rediss?://([^@/]*@)?[^@/:]+(:[0-9]+)?(/0?)?$"


# --- features ---------------------------------------------------------------------


class StoreSpec(ApiModel):
    """The online feature store (Redis): one primary, or a Redis Cluster."""

    model_config = ConfigDict(
        json_schema_extra=cel.rules(
            cel.rule(
                f"self.mode != 'cluster' || self.url.matches('{CLUSTER_URL_CEL}')",
                "a cluster store URL is redis:// or rediss:// host:port of one node, database 0",
            )
        )
    )

    url: str = Field(default="redis://redis:6379/0", pattern=URL_PATTERN)
    """Redis URL shared by the stream jobs (writers) and the serving pods (readers); for a
    cluster, any one node (the clients discover the others)."""
    mode: StoreMode = StoreMode.SINGLE
    """`single`: one Redis primary. `cluster`: a Redis Cluster; the feature job splits
    each batch by hash slot (every key of one user shares a slot)."""
    password_secret_ref: SecretKeyRef | None = None
    """Secret holding the Redis password, if any."""
    ttl: Duration = "168h"
    """Per-user features expire after this long without events."""

    @model_validator(mode="after")
    def _endpoint_fits_mode(self) -> Self:
        problem = endpoint_problem(self.url, self.mode)
        if problem:
            raise ValueError(problem)
        return self


class OnlineUpdatesSpec(ApiModel):
    """Online user-embedding updates from the items a user just touched."""

    enabled: bool = True
    """Update the user's embedding on every event; off means features only."""
    learning_rate: float = Field(default=0.1, gt=0.0, le=1.0)
    """Weight of the touched item's embedding in each update."""
    decay: float = Field(default=0.98, gt=0.0, le=1.0)
    """Per-event decay of the existing embedding before the update (1.0: no decay)."""


class ResourceRequirements(ApiModel):
    """Compute resources of a container, as in Kubernetes (`requests` and `limits`)."""

    # Quantities compare by value only with Kubernetes' quantity() library, which cel-python
    # lacks: requests <= limits stays an operator-side check; GPUs are whole numbers.
    model_config = ConfigDict(
        json_schema_extra=cel.rules(
            cel.rule(
                f"!has(self.requests) || !('{GPU_RESOURCE}' in self.requests) || "
                f"(has(self.limits) && '{GPU_RESOURCE}' in self.limits && "
                f"string(self.limits['{GPU_RESOURCE}']) == string(self.requests['{GPU_RESOURCE}']))",
                f"limits['{GPU_RESOURCE}'] must equal requests['{GPU_RESOURCE}']",
                ".limits",
            ),
            *(
                cel.rule(
                    f"!has(self.{side}) || !('{GPU_RESOURCE}' in self.{side}) || "
                    f"string(self.{side}['{GPU_RESOURCE}']).matches('^[0-9]+$')",
                    f"{GPU_RESOURCE} must be a whole number of GPUs",
                    f".{side}",
                )
                for side in ("requests", "limits")
            ),
        )
    )

    requests: dict[str, Quantity] = Field(default_factory=dict)
    """Minimum resources, e.g. `cpu: 500m`, `memory: 1Gi`."""
    limits: dict[str, Quantity] = Field(default_factory=dict)
    """Maximum resources; GPUs are asked for here as `nvidia.com/gpu: 1`."""

    @field_validator("requests", "limits")
    @classmethod
    def _gpu_is_whole(cls, value: dict[str, Quantity]) -> dict[str, Quantity]:
        gpus = value.get(GPU_RESOURCE)
        if gpus is not None and (not float(quantity_value(gpus)).is_integer()):
            raise ValueError(f"{GPU_RESOURCE} must be a whole number of GPUs, got {gpus!r}")
        return value

    @model_validator(mode="after")
    def _requests_within_limits(self) -> Self:
        for name, limit in self.limits.items():
            request = self.requests.get(name)
            if request is not None and quantity_value(request) > quantity_value(limit):
                raise field_error(("requests", name), f"request {request} exceeds limit {limit}")
        gpu_request = self.requests.get(GPU_RESOURCE)
        if gpu_request is not None and self.limits.get(GPU_RESOURCE) != gpu_request:
            # Kubernetes rejects extended resources whose request differs from the limit.
            raise field_error(("limits", GPU_RESOURCE), f"must equal requests[{GPU_RESOURCE!r}]")
        return self

    @property
    def gpus(self) -> int:
        """Number of GPUs asked for (0 when none)."""
        value = self.limits.get(GPU_RESOURCE, self.requests.get(GPU_RESOURCE, 0))
        return int(quantity_value(value))


class FeaturesSpec(ApiModel):
    """The stream feature job: events in, fresh per-user features out."""

    image: str | None = None
    """Container image; defaults to the stream-jobs image of the operator's own version."""
    replicas: int = Field(default=1, ge=0, le=256)
    """Initial replicas (the ScalingPolicy scales them by Pulsar backlog)."""
    last_n: int = Field(default=50, ge=1, le=1000)
    """How many recent items are kept per user."""
    windows: list[Duration] = Field(
        default_factory=lambda: ["1h", "24h"],
        min_length=1,
        max_length=8,
        json_schema_extra=cel.rules(
            cel.rule("self.all(w, self.exists_one(x, x == w))", "windows must be distinct")
        ),
    )
    """Sliding windows for the per-type event counts."""
    batch_size: int = Field(default=500, ge=1, le=10_000)
    """Events handled (and written to the store) per batch."""
    allowed_lateness: Duration = "10m"
    """An event up to this far behind its user's newest event is applied in its place
    (counts, recent items and sessions as if events had arrived in order); a later one
    goes to the dead-letter topic with reason `late`."""
    store: StoreSpec = Field(default_factory=StoreSpec)
    """The online feature store."""
    online_updates: OnlineUpdatesSpec = Field(default_factory=OnlineUpdatesSpec)
    """Online user-embedding updates."""
    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "250m", "memory": "256Mi"}, limits={"memory": "512Mi"}
        )
    )
    """Resources of each stream-job pod."""

    @field_validator("windows")
    @classmethod
    def _windows_distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"windows must be distinct, got {value}")
        return value


# --- model ------------------------------------------------------------------------


class ModelSpec(ApiModel):
    """The retrieval model: a two-tower network plus a FAISS index, packed as a TorchServe archive."""

    # index_fit_problems in CEL. `index` has no scalar default of its own: guard it.
    model_config = ConfigDict(
        json_schema_extra=cel.rules(
            cel.rule(
                "!has(self.numItems) || self.topK <= self.numItems",
                "topK exceeds the catalogue size numItems",
                ".topK",
            ),
            cel.rule(
                "!has(self.index) || self.index.type != 'HNSW' || !has(self.index.hnsw) || "
                "self.index.hnsw.efSearch >= self.topK",
                "efSearch is below topK; HNSW cannot return more than efSearch results",
                ".index.hnsw.efSearch",
            ),
            cel.rule(
                "!has(self.index) || self.index.type != 'IVF-PQ' || !has(self.index.ivfpq) || "
                "self.embeddingDim % self.index.ivfpq.m == 0",
                "index.ivfpq.m must divide embeddingDim",
                ".index.ivfpq.m",
            ),
            cel.rule(
                "!has(self.index) || self.index.type != 'IVF-PQ' || !has(self.index.ivfpq) || "
                "self.index.ivfpq.nprobe <= self.index.ivfpq.nlist",
                "nprobe exceeds nlist",
                ".index.ivfpq.nprobe",
            ),
            cel.rule(
                "!has(self.numItems) || !has(self.index) || self.index.type != 'IVF-PQ' || "
                "!has(self.index.ivfpq) || self.index.ivfpq.nlist <= self.numItems",
                "nlist exceeds the catalogue size numItems",
                ".index.ivfpq.nlist",
            ),
            cel.rule(
                "!has(self.numItems) || !has(self.index) || self.index.type != 'IVF-PQ' || "
                "!has(self.index.ivfpq) || !has(self.index.ivfpq.refineFactor) || "
                "self.index.ivfpq.refineFactor == 1 || "
                "self.topK * self.index.ivfpq.refineFactor <= self.numItems",
                "topK x refineFactor exceeds the catalogue size numItems",
                ".index.ivfpq.refineFactor",
            ),
        )
    )

    name: DnsLabel = "retrieval"
    """Model name in TorchServe (`/predictions/NAME/VERSION`)."""
    version: str = Field(pattern=MODEL_VERSION_PATTERN)
    """Model version; changing it starts a progressive rollout."""
    archive_uri: str | None = Field(default=None, pattern=ARCHIVE_URI_PATTERN)
    """Where the `.mar` archive lives: http(s)://, s3://, pvc://CLAIM/PATH, or file:// (local mode). Required in a cluster; local mode trains one when omitted."""
    embedding_dim: int = Field(default=64, ge=2, le=4096)
    """Dimension of user and item embeddings."""
    num_items: int | None = Field(default=None, ge=1)
    """Number of items in the catalogue, when known; lets topK and the index be checked up front."""
    top_k: int = Field(default=50, ge=1, le=1000)
    """Largest number of items one request may ask for (and the default)."""
    index: IndexSpec = Field(default_factory=IndexSpec)
    """The FAISS index."""
    quantize_tower: bool = False
    """Run the user tower with int8 dynamic quantization (CPU serving)."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems = index_fit_problems(
            self.index, embedding_dim=self.embedding_dim, num_items=self.num_items, top_k=self.top_k
        )
        if problems:
            raise field_error(*problems[0])
        return self


# --- serving ----------------------------------------------------------------------


class BatchingSpec(ApiModel):
    """TorchServe dynamic batching."""

    max_batch_size: int = Field(default=32, ge=1, le=1024)
    """Most requests handled together by one worker."""
    max_batch_delay_ms: int = Field(default=5, ge=0, le=10_000)
    """Longest a request waits for its batch to fill (0 is rendered as 1: TorchServe reads 0 as unset, i.e. 100 ms)."""


class Toleration(ApiModel):
    """A Kubernetes toleration, e.g. for dedicated GPU nodes."""

    key: str | None = None
    """Taint key; empty with operator Exists tolerates everything."""
    operator: str = Field(default="Equal", pattern=r"^(Equal|Exists)$")
    """Equal or Exists."""
    value: str | None = None
    """Taint value (with operator Equal)."""
    effect: str | None = Field(default=None, pattern=r"^(NoSchedule|PreferNoSchedule|NoExecute)$")
    """NoSchedule, PreferNoSchedule or NoExecute; empty matches all."""
    toleration_seconds: int | None = Field(default=None, ge=0)
    """With NoExecute: how long the pod stays bound after the taint appears."""


class RecommendationCacheSpec(ApiModel):
    """Each serving worker keeps its recent answers: a user who asks again before any new
    event of theirs reached the feature store (the next page, a refreshed screen) gets the
    same answer without the user tower or the index search. A new event changes the
    user's state version, and so the answer is computed afresh."""

    max_entries: int = Field(default=10_000, ge=0, le=10_000_000)
    """Answers kept per worker (least recently used goes first); 0 turns the cache off."""
    ttl_seconds: int = Field(default=60, ge=1, le=86_400)
    """How long an answer is kept at most."""


class ServingSpec(ApiModel):
    """TorchServe pods running the retrieval handler."""

    image: str | None = None
    """Container image; defaults to the model-server image of the operator's version (`-gpu` when GPUs are asked for)."""
    replicas: int = Field(default=1, ge=0, le=1000)
    """Initial replicas; the ScalingPolicy bounds and scales them."""
    workers: int = Field(default=1, ge=1, le=64)
    """TorchServe workers per pod for the model (each single-threaded; scale with batching and workers)."""
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    """Dynamic batching."""
    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "1", "memory": "2Gi"}, limits={"memory": "2Gi"}
        )
    )
    """Resources of each serving pod; GPUs via `limits: {nvidia.com/gpu: 1}`."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the serving pods must run on (e.g. a GPU node pool)."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Taints the serving pods tolerate (e.g. `nvidia.com/gpu`)."""
    response_timeout_s: int = Field(default=10, ge=1, le=600)
    """TorchServe's per-request timeout for the handler."""
    cache: RecommendationCacheSpec = Field(default_factory=RecommendationCacheSpec)
    """Per-worker cache of answers for active sessions, keyed by the request and the user's state version."""


class RequestIdKeysSpec(ApiModel):
    """The Secret holding the keys the gateway signs request ids with (HMAC-SHA256).

    Clicks are attributed to a model version through the request id of the answer they
    follow, and only ids that verify count, so every replica must share the keys. Rotate
    by moving the current value to `previousKey` and writing a new `currentKey`: ids
    signed with either verify."""

    secret_name: DnsLabel
    """Name of the Secret (in the resource's namespace)."""
    current_key: str = Field(default="current", min_length=1)
    """Key of the signing key (at least 16 bytes)."""
    previous_key: str = Field(default="previous", min_length=1)
    """Key of the key before the last rotation (optional in the Secret)."""


class GatewaySpec(ApiModel):
    """The gateway: the only endpoint clients call."""

    image: str | None = None
    """Container image; defaults to the stream-jobs image (which also serves the gateway)."""
    replicas: int = Field(default=2, ge=0, le=1000)
    """Initial replicas."""
    timeout_ms: int = Field(default=250, ge=1, le=60_000)
    """Serving call timeout; past it the gateway answers from the popularity fallback.
    The model server is told this deadline and skips requests that have outlived it."""
    max_in_flight: int = Field(default=64, ge=1, le=100_000)
    """Recommend requests each gateway pod works on at once. Past it, or when a request's
    deadline can no longer be met, the gateway answers 503 with Retry-After at once
    instead of queueing (counted in recsys_gateway_shed_total). Size it as the serving
    throughput one pod should get times the serving latency (Little's law): 64 is about
    600 req/s at 100 ms."""
    request_id_keys: RequestIdKeysSpec | None = None
    """Where the request-id signing keys are. Without it each gateway pod signs with a
    random key of its own, so a click reaching another replica (or the same one after a
    restart) than the answer it follows is refused: set it with more than one replica."""
    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "250m", "memory": "256Mi"}, limits={"memory": "512Mi"}
        )
    )
    """Resources of each gateway pod."""


# --- scaling and rollout ----------------------------------------------------------


class PolicyRef(ApiModel):
    """Reference to a ScalingPolicy in the same namespace."""

    name: DnsLabel
    """Name of the ScalingPolicy."""


class ScalingOverrides(ApiModel):
    """Per-system tightening of the referenced ScalingPolicy. Each value must lie within the policy's."""

    model_config = ConfigDict(
        json_schema_extra=cel.rules(
            cel.rule(
                "!has(self.minReplicas) || !has(self.maxReplicas) || "
                "self.minReplicas <= self.maxReplicas",
                "minReplicas exceeds maxReplicas",
                ".minReplicas",
            )
        )
    )

    min_replicas: int | None = Field(default=None, ge=0)
    """Serving minimum replicas; at least the policy's minReplicas."""
    max_replicas: int | None = Field(default=None, ge=1)
    """Serving maximum replicas; at most the policy's maxReplicas."""
    target_p99_latency_ms: float | None = Field(default=None, gt=0)
    """Serving p99 latency target; at most the policy's."""
    backlog_per_replica: int | None = Field(default=None, ge=1)
    """Pulsar backlog per stream-job replica; at most the policy's."""

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and self.min_replicas > self.max_replicas
        ):
            raise field_error(
                "minReplicas",
                f"minReplicas {self.min_replicas} exceeds maxReplicas {self.max_replicas}",
            )
        return self


class AnalysisSpec(ApiModel):
    """What a canary must show, against the stable version over the same window, to advance.

    Rates are compared with a variance that accounts for users who differ, and the
    false-rollback budget 1 - confidence is spread over the whole rollout's analyses
    (docs/rollout-analysis.md)."""

    max_p99_latency_ms: float = Field(default=100.0, gt=0, le=60_000)
    """Canary p99 request latency must stay at or below this."""
    max_error_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    """Canary share of failed requests must stay at or below this."""
    min_ctr_ratio: float = Field(default=1.0, gt=0.0, le=10.0)
    """Canary CTR divided by stable CTR must not be significantly below this (1: roll back a canary significantly worse than stable; 0.95 tolerates a 5% drop)."""
    min_impressions: int = Field(default=500, ge=1)
    """Impressions each variant needs in the window before CTR is judged; fewer means wait."""
    confidence: float = Field(default=0.95, ge=0.5, lt=1.0)
    """A canary that meets the thresholds is rolled back on significance with probability at most 1 - confidence over the whole rollout."""
    min_detectable_drop: float = Field(default=0.10, gt=0.0, lt=1.0)
    """Relative CTR drop the rollout must catch: the last analysed step waits until it has the impressions to detect it with `power`."""
    power: float = Field(default=0.8, ge=0.5, lt=1.0)
    """Probability of rolling back a canary whose CTR is minDetectableDrop below stable's, at the last analysed step."""
    sample_ratio_p_value: float = Field(default=0.001, gt=0.0, le=0.1)
    """A canary share of impressions this improbable under its weight is a sample-ratio mismatch: the step holds, never passes."""
    min_dwell_ratio: float | None = Field(default=None, gt=0.0, le=10.0)
    """Optional guardrail: canary dwell time per impression divided by stable's must not be significantly below this."""
    min_purchase_ratio: float | None = Field(default=None, gt=0.0, le=10.0)
    """Optional guardrail: canary purchases per impression divided by stable's must not be significantly below this."""


class WebhookType(StrEnum):
    """When a rollout webhook is called (Flagger's names where the meaning is the same)."""

    PRE_ROLLOUT = "pre-rollout"
    ROLLOUT = "rollout"
    PRE_PROMOTION = "pre-promotion"


MAX_WEBHOOK_TIMEOUT_S = 300.0


class RolloutWebhook(ApiModel):
    """An HTTP check a rollout must pass: a 2xx answer passes, anything else (or no answer in time) fails."""

    name: DnsLabel
    """Names the webhook in status, Events and the rollback reason."""
    type: WebhookType
    """pre-rollout: once, before the canary gets traffic (smoke test); rollout: before every analysis (load test); pre-promotion: right before the canary becomes stable."""
    url: str = Field(pattern=r"^https?://\S+$")
    """Where the POST goes; its JSON body is described in docs/concepts.md (name, namespace, type, phase, versions, weight, metadata)."""
    timeout: Duration = "10s"
    """How long one call may take; past it the call has failed (at most 5m)."""
    retries: int = Field(default=2, ge=0, le=10)
    """Failed calls tolerated in a row before the rollout is rolled back; each retry is one rollout tick later."""
    metadata: dict[str, str] = Field(default_factory=dict)
    """Passed through to the webhook as `metadata` (e.g. a test suite name, a load-test command)."""

    @field_validator("timeout")
    @classmethod
    def _timeout_bounded(cls, value: str) -> str:
        if parse_duration(value) > MAX_WEBHOOK_TIMEOUT_S:
            raise ValueError(f"timeout {value} exceeds 5m: a rollout tick must not wait longer")
        return value


class ShadowSpec(ApiModel):
    """A phase before any traffic: the canary answers mirrored requests that users never see, and its lists are compared with the stable's."""

    duration: Duration = "10m"
    """How long requests are mirrored before the comparison is judged (again after each Wait)."""
    percent: int = Field(default=100, ge=1, le=100)
    """Share of the stable's answered requests mirrored to the canary."""
    min_requests: int = Field(default=200, ge=1)
    """Compared requests needed in the window before judging; fewer means wait."""
    min_overlap: float = Field(default=0.0, ge=0.0, le=1.0)
    """Mean share of the stable's items the canary also recommends must be at least this (0: not checked)."""
    min_predicted_ctr_ratio: float = Field(default=0.9, ge=0.0, le=10.0)
    """Predicted CTR of the canary's lists divided by the stable's must be at least this (0: not checked)."""
    max_error_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    """Share of mirrored requests the canary failed to answer must stay at or below this."""


class CanaryReplicas(StrEnum):
    """Where the canary's serving replicas come from."""

    SURGE = "Surge"
    FROM_STABLE = "FromStable"


MAX_STEPS = 20


class RolloutSpec(ApiModel):
    """How a new model version is introduced: canary weights, pauses and analysis."""

    steps: list[int] = Field(
        default_factory=lambda: [10, 25, 50, 100],
        min_length=1,
        max_length=MAX_STEPS,
        json_schema_extra=cel.rules(
            cel.rule("self.all(w, w >= 1 && w <= 100)", "weights are percentages in 1..100"),
            cel.rule(cel.strictly_increasing(MAX_STEPS), "weights must be strictly increasing"),
            cel.rule("self[size(self) - 1] == 100", "the last weight must be 100"),
        ),
    )
    """Canary traffic weights in percent: strictly increasing, each in 1..100, ending at 100."""
    interval: Duration = "5m"
    """How long each step runs before it is analysed."""
    progress_deadline: Duration = "1h"
    """A rollout not finished by then (e.g. stuck inconclusive) is rolled back."""
    max_inconclusive: int = Field(default=3, ge=1, le=100)
    """Inconclusive analyses in a row tolerated at one step before rolling back."""
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    """Pass/fail thresholds."""
    auto_rollback: bool = True
    """Roll back on a failed analysis; off means pause and wait for a person."""
    paused: bool = False
    """Hold the rollout at its current step."""
    shadow: ShadowSpec | None = None
    """A shadow phase before the first step (after the pre-rollout webhooks): mirrored traffic only, compared on overlap and predicted CTR."""
    confirm_promotion: bool = False
    """Hold a canary that passed its last analysis until a person confirms (`recsys.dev/rollout-action=promote`, or `recsys rollout promote` locally)."""
    webhooks: list[RolloutWebhook] = Field(default_factory=list, max_length=20)
    """HTTP checks before the rollout, before every analysis and before promotion; a failure past its retries rolls back with the webhook's message."""
    canary_replicas: CanaryReplicas = CanaryReplicas.SURGE
    """Surge: the canary's pods come on top of the stable's; FromStable: the stable gives up as many as the canary takes (a fixed GPU budget)."""

    @field_validator("steps")
    @classmethod
    def _steps_valid(cls, steps: list[int]) -> list[int]:
        for i, weight in enumerate(steps):
            if not 1 <= weight <= 100:
                raise ValueError(f"step {i} has weight {weight}; weights are percentages in 1..100")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"weights must be strictly increasing, got {steps}")
        if steps[-1] != 100:
            raise ValueError(f"the last weight must be 100 (full promotion), got {steps[-1]}")
        return steps

    @field_validator("webhooks")
    @classmethod
    def _webhook_names_distinct(cls, hooks: list[RolloutWebhook]) -> list[RolloutWebhook]:
        names = [hook.name for hook in hooks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"webhook names must be distinct, repeated: {', '.join(duplicates)}")
        return hooks

    def webhooks_of(self, type_: WebhookType) -> list[RolloutWebhook]:
        return [hook for hook in self.webhooks if hook.type is type_]


class RecommenderSystemSpec(ApiModel):
    """A real-time recommender system: events, features, a retrieval model, serving, a gateway, scaling and rollouts."""

    model_config = ConfigDict(
        json_schema_extra=cel.rules(
            cel.rule(
                "has(self.scalingPolicyRef) || !has(self.scaling) || !("
                + " || ".join(
                    f"has(self.scaling.{name})"
                    for name in (
                        "minReplicas",
                        "maxReplicas",
                        "targetP99LatencyMs",
                        "backlogPerReplica",
                    )
                )
                + ")",
                "scaling overrides need a scalingPolicyRef to tighten",
                ".scaling",
            )
        )
    )

    events: EventsSpec = Field(default_factory=EventsSpec)
    """Pulsar cluster and topics."""
    features: FeaturesSpec = Field(default_factory=FeaturesSpec)
    """Stream feature job and the online store."""
    model: ModelSpec
    """The retrieval model and its index."""
    serving: ServingSpec = Field(default_factory=ServingSpec)
    """TorchServe pods."""
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    """The gateway clients call."""
    scaling_policy_ref: PolicyRef | None = None
    """The ScalingPolicy (owned by SREs) that bounds autoscaling; no autoscaling when omitted."""
    scaling: ScalingOverrides = Field(default_factory=ScalingOverrides)
    """Optional tightening of the referenced policy."""
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    """Progressive rollout of new model versions."""
    training: TrainingSpec | None = None
    """Retraining from the offline event log on a schedule, gated against the stable model; no retraining when omitted."""

    @model_validator(mode="after")
    def _overrides_need_policy(self) -> Self:
        if self.scaling_policy_ref is None and self.scaling.model_fields_set:
            raise field_error("scaling", "scaling overrides need a scalingPolicyRef to tighten")
        return self


# `training` builds on ResourceRequirements above, so its spec is imported once this
# module's models exist, and the top-level spec is completed with it.
from recsys_operator.api.training import TrainingSpec  # noqa: E402

RecommenderSystemSpec.model_rebuild()
