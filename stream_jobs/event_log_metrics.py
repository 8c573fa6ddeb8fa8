"""The event-log sink's Prometheus metrics (own registry, as the feature job's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from recsys_contracts import metric_names as names


@dataclass
class EventLogMetrics:
    system: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r, system = self.registry, names.SYSTEM_LABEL
        self.rows = Counter(
            names.EVENT_LOG_ROWS, "Rows written in new batch files.", [system, "table"], registry=r
        )
        self.files = Counter(
            names.EVENT_LOG_FILES,
            "Parquet files written, by kind (batch, compacted).",
            [system, "table", "kind"],
            registry=r,
        )
        self.bytes = Counter(
            names.EVENT_LOG_BYTES, "Parquet bytes written.", [system, "table", "kind"], registry=r
        )
        self.duplicates = Counter(
            names.EVENT_LOG_DUPLICATES,
            "Redelivered or resent events dropped, by stage (sink, compaction).",
            [system, "table", "stage"],
            registry=r,
        )
        self.dead_letters = Counter(
            names.EVENT_LOG_DEAD_LETTERED,
            "Events sent to the dead-letter topic, by reason code.",
            [system, "reason"],
            registry=r,
        )
        self.write_errors = Counter(
            names.EVENT_LOG_WRITE_ERRORS,
            "Failed writes to the log store (retried; the messages stay unacknowledged).",
            [system, "error"],
            registry=r,
        )
        self.pending_impressions = Gauge(
            names.EVENT_LOG_PENDING_IMPRESSIONS,
            "Impressions waiting for their clicks (unacknowledged).",
            [system],
            registry=r,
        )
        self.last_write = Gauge(
            names.EVENT_LOG_LAST_WRITE, "When the sink last wrote a file.", [system], registry=r
        )

    def serve(self, host: str, port: int) -> Any:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
