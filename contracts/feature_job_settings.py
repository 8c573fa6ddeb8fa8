"""Configuration of the stream feature job: one model, filled from env vars and CLI flags.

Every field `name` can be set with the environment variable `RECSYS_<NAME>`
(upper case; lists comma-separated) and with the flag `--<name>` (dashes for
underscores) of `recsys features run`; a flag wins over the environment. The
operator renders these variables into the job's pods
(`recsys_operator.render.features`, names from `env_name`), so the model is the
contract between them and lives here.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, SecretStr, field_validator, model_validator

from recsys_contracts.api_base import Duration, parse_duration
from recsys_contracts.env_vars import PREFIX as ENV_PREFIX
from recsys_contracts.process_settings import ProcessSettings
from recsys_contracts.store_endpoint import (
    URL_PATTERN,
    StoreEndpoint,
    StoreMode,
    endpoint_problem,
)


class SubscriptionType(StrEnum):
    KEY_SHARED = "KeyShared"
    FAILOVER = "Failover"
    SHARED = "Shared"


class FeatureJobSettings(ProcessSettings):
    """Everything the feature job needs to know; see docs/stream-features.md."""

    list_fields: ClassVar[frozenset[str]] = frozenset({"windows"})

    system_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """The RecommenderSystem's id in the feature keys (`<namespace>.<name>`)."""
    pulsar_service_url: str = Field(
        default="pulsar://127.0.0.1:6650", pattern=r"^pulsar(\+ssl)?://.+"
    )
    pulsar_token: SecretStr | None = None
    """JWT for Pulsar authentication (from the auth Secret)."""
    pulsar_admin_url: str | None = Field(default=None, pattern=r"^https?://.+")
    """Pulsar admin REST API, only to export the subscription backlog as a metric."""
    interactions_topic: str = Field(
        default="persistent://public/default/interactions", min_length=1
    )
    subscription: str = Field(default="recsys-features", min_length=1)
    subscription_type: SubscriptionType = SubscriptionType.KEY_SHARED
    """KeyShared or Failover keep one user's events on one consumer; Shared only locally."""
    dead_letter_topic: str | None = None
    """Where malformed events go; defaults to `<interactions_topic>-dead-letter`."""

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", pattern=URL_PATTERN)
    redis_mode: StoreMode = StoreMode.SINGLE
    """`cluster`: `redis_url` names one node of a Redis Cluster (`store_endpoint`)."""
    redis_password: SecretStr | None = None
    store_ttl_seconds: int = Field(default=7 * 86_400, ge=1)
    """Per-user keys expire this long after the user's last write."""

    last_n: int = Field(default=50, ge=1, le=1000)
    windows: list[Duration] = Field(
        default_factory=lambda: ["1h", "24h"], min_length=1, max_length=8
    )
    session_gap: Duration = "30m"
    dedup_capacity: int = Field(default=64, ge=1, le=100_000)
    """Event ids remembered per user for idempotence."""
    max_future: Duration = "5m"
    """Events further ahead of the job's clock than this are dead-lettered (the gateway
    refuses them with the same default, `recsys_contracts.events.MAX_FUTURE_MS`)."""
    max_past: Duration = "7d"
    """Events further behind the job's clock than this are dead-lettered
    (`recsys_contracts.events.MAX_PAST_MS` at the gateway)."""
    allowed_lateness: Duration = "10m"
    """An event up to this far behind its user's newest event is applied in its place
    (windows, recent items and sessions as for the sorted stream); a later one is
    dead-lettered with reason `late`."""

    online_updates: bool = True
    learning_rate: float = Field(default=0.1, gt=0.0, le=1.0)
    decay: float = Field(default=0.98, gt=0.0, le=1.0)
    model_version: str | None = None
    """The served model version: names the embeddings of a single model's files."""
    model_archive_uri: str | None = None
    """The model version's archive (`.mar`) or directory: a path, file:// or http(s)://."""
    model_archives: dict[str, str] = Field(default_factory=dict)
    """Every served version's archive, `VERSION=URI,VERSION=URI` in the environment: the
    stable version and, during a rollout, the canary, so both users' embeddings stay fresh."""
    embeddings_path: Path | None = None
    """Item embeddings on disk: one model's directory or archive, or one sub-directory
    per model version (local mode, rollouts with both versions mounted)."""
    embeddings_reload: Duration = "30s"
    popular_half_life: Duration = "7d"

    batch_size: int = Field(default=500, ge=1, le=10_000)
    batch_wait: Duration = "5ms"
    """How long a batch waits to fill before it is processed anyway."""
    resubscribe_idle: Duration | None = None
    """After this long without a message, close and reopen the subscription: pulsar-lite
    sometimes stops dispatching one partition of a partitioned topic to a consumer
    (batched messages, Shared) until it resubscribes. Off by default; local mode sets it."""
    rebuild_when_empty: bool = True
    """At start, when the store holds no key of this system (Redis lost its data, or a
    new store), rebuild it from the topic's retention first (`stream_jobs.rebuild`)."""
    drain_timeout: Duration = "20s"
    """On SIGTERM, how long in-flight work may take before the job exits without acking it."""

    metrics_address: str | None = Field(default="127.0.0.1:9102", pattern=r"^[^:\s]*:\d{1,5}$")
    """host:port of /metrics (`0.0.0.0:PORT` in a pod); empty turns it off."""

    @field_validator("windows")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"windows must be distinct, got {value}")
        return value

    @field_validator("model_archives", mode="before")
    @classmethod
    def _version_uri_pairs(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        pairs = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            version, sep, uri = part.partition("=")
            if not sep or not version or not uri:
                raise ValueError(f"model_archives: expected VERSION=URI, got {part!r}")
            pairs[version] = uri
        return pairs

    @model_validator(mode="after")
    def _store_endpoint_is_usable(self) -> FeatureJobSettings:
        problem = endpoint_problem(self.redis_url, self.redis_mode)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def store_endpoint(self) -> StoreEndpoint:
        return StoreEndpoint(self.redis_url, self.redis_mode)

    @model_validator(mode="after")
    def _popular_scores_stay_finite(self) -> FeatureJobSettings:
        # Forward-decayed scores grow by 2x per half-life since 2026; a short
        # half-life would overflow a double within the system's lifetime.
        if parse_duration(self.popular_half_life) < 86_400:
            raise ValueError("popular_half_life must be at least 1d")
        return self

    @property
    def dead_letters(self) -> str:
        return self.dead_letter_topic or f"{self.interactions_topic}-dead-letter"


def env_name(field: str) -> str:
    """The environment variable of the setting `field` (`redis_url` -> `RECSYS_REDIS_URL`)."""
    if field not in FeatureJobSettings.model_fields:
        raise KeyError(f"the feature job has no setting {field!r}")
    return ENV_PREFIX + field.upper()


def duration_ms(duration: str) -> int:
    """Milliseconds in a duration setting such as `20ms` or `168h`."""
    return round(parse_duration(duration) * 1000)
