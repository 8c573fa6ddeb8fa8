"""Instant queries against one Prometheus server, for the rollout's and the triggers' readings.

One attempt per query, and any failure (unreachable, a timeout, a bad answer) is None,
logged once: a Prometheus that is down turns into "no data" quickly, and the caller
decides what no data means (inconclusive, nothing fires) - never a pass or a firing.
"""

from __future__ import annotations

import logging

from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

log = logging.getLogger(__name__)

MIN_RANGE_S = 15
"""The shortest range a reading uses: `increase()` needs two scrapes inside it."""


def range_duration(window_s: float) -> str:
    """A PromQL range duration of `window_s` whole seconds, at least MIN_RANGE_S."""
    return f"{max(int(window_s), MIN_RANGE_S)}s"


class PrometheusReader:
    def __init__(self, url: str, timeout_s: int = 5) -> None:
        self.prometheus = PrometheusConnect(
            url=url, disable_ssl=True, timeout=timeout_s, retry=Retry(total=0, connect=0, read=0)
        )

    def vector(self, query: str, at: float | None = None) -> list[dict] | None:
        """The instant vector of `query` (at the Unix time `at`, else now); None on failure."""
        try:
            params = None if at is None else {"time": f"{at:.3f}"}
            return list(self.prometheus.custom_query(query, params=params))
        except Exception as exc:  # unreachable, timeout, bad answer: all mean "no data"
            log.warning("Prometheus query failed (%s): %s", exc, query)
            return None

    def value(
        self, query: str, if_empty: float | None = None, at: float | None = None
    ) -> float | None:
        """The first series' value (a `sum(...)` has one): `if_empty` for an empty vector;
        None on failure."""
        result = self.vector(query, at)
        if result is None:
            return None
        if not result:
            return if_empty
        try:
            return float(result[0]["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            return None

    def values_by(self, label: str, query: str, at: float | None = None) -> dict[str, float] | None:
        """`label`'s value -> the series' value (a series without it is keyed "", as
        Prometheus reads a missing label); {} for an empty vector; None on failure."""
        result = self.vector(query, at)
        if result is None:
            return None
        try:
            return {str(s["metric"].get(label, "")): float(s["value"][1]) for s in result}
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            return None
