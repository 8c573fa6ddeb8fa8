"""Configuration of the event-log sink (`recsys event-log run`): env vars and CLI flags.

As for the feature job, every field `name` can be set as `RECSYS_<NAME>` and as
`--<name>` (a flag wins). The layout the sink writes is `recsys_contracts.event_log_layout`.
"""

from __future__ import annotations

from pydantic import Field, SecretStr

from recsys_contracts.api_base import Duration
from recsys_contracts.feature_job_settings import SubscriptionType
from recsys_contracts.process_settings import ProcessSettings


class EventLogSettings(ProcessSettings):
    """Everything the sink needs; see docs/event-log.md."""

    log_uri: str = Field(min_length=1)
    """Root of the log: a folder (path or file://) or s3://bucket/prefix."""
    system_id: str = Field(default="local", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """The RecommenderSystem (`<namespace>.<name>`), the `system` label of the metrics."""
    pulsar_service_url: str = Field(
        default="pulsar://127.0.0.1:6650", pattern=r"^pulsar(\+ssl)?://.+"
    )
    pulsar_token: SecretStr | None = None
    interactions_topic: str = Field(
        default="persistent://public/default/interactions", min_length=1
    )
    impressions_topic: str | None = None
    """The gateway's impressions; None: only impressions found on the interactions topic."""
    subscription: str = Field(default="recsys-event-log", min_length=1)
    subscription_type: SubscriptionType = SubscriptionType.SHARED
    """Rows need no per-user order, so replicas may share the topics."""
    dead_letter_topic: str | None = None
    """Where malformed events go; defaults to `<interactions_topic>-event-log-dead-letter`
    (not the feature job's, which dead-letters the same messages for its own reasons)."""

    flush_rows: int = Field(default=5000, ge=1, le=1_000_000)
    """Buffered events that make the sink write its files."""
    flush_interval: Duration = "5s"
    """Longest time an event waits in the buffer (and unacknowledged) before it is written."""
    click_window: Duration = "30m"
    """How long, in event time, an impression waits for its clicks before it is written."""
    max_pending_impressions: int = Field(default=20_000, ge=1, le=1_000_000)
    """Impressions waiting for clicks are unacknowledged, and a broker stops dispatching to
    a consumer with too many unacked messages (Pulsar's maxUnackedMessagesPerConsumer,
    50,000 by default): past this many, the oldest are written with the clicks seen so far."""
    dedup_horizon: Duration = "2h"
    """At start, the ids in files written this recently are loaded, so the messages a
    crash left unacknowledged are dropped when they come back."""
    compact_min_files: int = Field(default=8, ge=2, le=10_000)
    """A partition with this many files is merged into one."""
    compact_interval: Duration = "1m"
    max_future: Duration = "5m"
    """Events further ahead of the sink's clock are dead-lettered (they would open
    partitions in the future and move the join's clock)."""
    batch_size: int = Field(default=1000, ge=1, le=10_000)
    batch_wait: Duration = "50ms"
    resubscribe_idle: Duration | None = None
    """After this long without a message and nothing unacknowledged, reopen the
    subscription (pulsar-lite sometimes stops dispatching a partition; local mode)."""
    drain_timeout: Duration = "10s"
    """On SIGTERM, time left to write the buffer (unwritten events stay unacked)."""
    metrics_address: str | None = Field(default=None, pattern=r"^[^:]*:\d+$")
    """host:port of /metrics; None (empty in the environment): off."""

    @property
    def dead_letters(self) -> str:
        return self.dead_letter_topic or f"{self.interactions_topic}-event-log-dead-letter"

    @property
    def topics(self) -> list[str]:
        return [t for t in (self.interactions_topic, self.impressions_topic) if t]
