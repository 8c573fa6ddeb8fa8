"""The handler's own metrics: one declaration shared by the handler (which emits them)
and the TorchServe metrics config (which must declare them, or TorchServe drops them).

TorchServe (prometheus mode) exports each on its metrics port with the labels below
plus `Hostname`. Latencies are histograms in milliseconds with the Prometheus client's
default buckets (0.005 to 10, so 5 µs to 10 ms; slower lands in +Inf). Every metric
carries `model_version`, so a canary and the stable version compare directly.

Each emission is one log line from the worker that TorchServe parses, so a batch emits
as few as possible: the batch-size histogram also counts batches (`_count`) and
requests (`_sum`), and counters are emitted only when they grow.

This module imports nothing heavy: the operator renders the config from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DIMENSIONS = ("model_name", "model_version")
"""Label names of every handler metric, in the order the values are given."""


@dataclass(frozen=True)
class HandlerMetric:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    unit: str
    description: str


HANDLER_LATENCY = HandlerMetric(
    name="recsys_handler_latency_ms",
    kind="histogram",
    unit="ms",
    description="Time the handler spends on one batch: parsing, store read, tower, search, response.",
)
SEARCH_LATENCY = HandlerMetric(
    name="recsys_search_latency_ms",
    kind="histogram",
    unit="ms",
    description="Time of the FAISS search of one batch.",
)
STORE_LATENCY = HandlerMetric(
    name="recsys_store_latency_ms",
    kind="histogram",
    unit="ms",
    description="Time of the one pipelined feature-store read of a batch.",
)
BATCH_SIZE = HandlerMetric(
    name="recsys_handler_batch_size",
    kind="histogram",
    unit="count",
    description="Requests per batch; its _count is the number of batches, its _sum the requests.",
)
BAD_REQUESTS = HandlerMetric(
    name="recsys_handler_bad_requests_total",
    kind="counter",
    unit="count",
    description="Requests refused with a 4xx.",
)
STORE_MISSES = HandlerMetric(
    name="recsys_store_misses_total",
    kind="counter",
    unit="count",
    description="Users with an id for whom the feature store had neither recent items nor an embedding, or could not be read.",
)
STORE_ERRORS = HandlerMetric(
    name="recsys_store_errors_total",
    kind="counter",
    unit="count",
    description="Feature-store reads that failed.",
)
COLD_STARTS = HandlerMetric(
    name="recsys_cold_starts_total",
    kind="counter",
    unit="count",
    description="Requests answered from popularity (unknown user, no recent items).",
)
CACHE_HITS = HandlerMetric(
    name="recsys_handler_cache_hits_total",
    kind="counter",
    unit="count",
    description="Requests answered from the per-session cache (same request, unchanged user state).",
)
CACHE_MISSES = HandlerMetric(
    name="recsys_handler_cache_misses_total",
    kind="counter",
    unit="count",
    description="Cacheable requests (with a user id, store readable) that were computed; hit rate = hits / (hits + misses).",
)
HANDLER_METRICS = (
    HANDLER_LATENCY,
    SEARCH_LATENCY,
    STORE_LATENCY,
    BATCH_SIZE,
    BAD_REQUESTS,
    STORE_MISSES,
    STORE_ERRORS,
    COLD_STARTS,
    CACHE_HITS,
    CACHE_MISSES,
)
