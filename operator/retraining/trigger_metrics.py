"""What the triggers read from Prometheus: the stable version's CTR and its served-score histogram.

All series are the gateway's, selected by the system and the stable model version (any
variant: a version promoted from canary keeps the answers it served as one). Counters
and histogram buckets are read with `increase()` over a window ending `offset` seconds
ago, so a reading counts through restarts. Any failure (Prometheus unreachable, a bad
answer) is None: the trigger then decides nothing, it never fires on missing data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from recsys_contracts.metric_names import CLICKS, IMPRESSIONS, SERVED_TOP_SCORE

log = logging.getLogger(__name__)


def _range(window_s: float, offset_s: float) -> str:
    text = f"[{max(int(window_s), 15)}s]"
    return f"{text} offset {int(offset_s)}s" if offset_s >= 1 else text


def ctr_queries(system_id: str, version: str, window_s: float, offset_s: float) -> dict[str, str]:
    sel = f'system="{system_id}",model_version="{version}"'
    r = _range(window_s, offset_s)
    return {
        "clicks": f"sum(increase({CLICKS}{{{sel}}}{r}))",
        "impressions": f"sum(increase({IMPRESSIONS}{{{sel}}}{r}))",
    }


def score_histogram_query(system_id: str, version: str, window_s: float, offset_s: float) -> str:
    sel = f'system="{system_id}",model_version="{version}"'
    return f"sum by (le) (increase({SERVED_TOP_SCORE}_bucket{{{sel}}}{_range(window_s, offset_s)}))"


@dataclass(frozen=True)
class Ctr:
    clicks: float
    impressions: float

    @property
    def value(self) -> float | None:
        return self.clicks / self.impressions if self.impressions > 0 else None


class PrometheusTriggerMetrics:
    """The triggers' readings of one system from one Prometheus server."""

    def __init__(self, url: str, system_id: str, timeout_s: int = 5) -> None:
        # One attempt per query: a Prometheus that is down must not hold the timer.
        self.prometheus = PrometheusConnect(
            url=url, disable_ssl=True, timeout=timeout_s, retry=Retry(total=0, connect=0, read=0)
        )
        self.system_id = system_id

    def _vector(self, query: str) -> list[dict] | None:
        try:
            return list(self.prometheus.custom_query(query))
        except Exception as exc:  # unreachable, timeout, bad answer: all mean "no data"
            log.warning("Prometheus query failed (%s): %s", exc, query)
            return None

    def _sum(self, query: str) -> float | None:
        """The value of a `sum(...)`: 0 for an empty vector (no such series), None on failure."""
        result = self._vector(query)
        if result is None:
            return None
        try:
            return float(result[0]["value"][1]) if result else 0.0
        except (KeyError, IndexError, TypeError, ValueError):
            return None

    def ctr(self, version: str, window_s: float, offset_s: float = 0.0) -> Ctr | None:
        """The version's clicks and impressions over [now - offset - window, now - offset]."""
        values = {
            name: self._sum(query)
            for name, query in ctr_queries(self.system_id, version, window_s, offset_s).items()
        }
        if values["clicks"] is None or values["impressions"] is None:
            return None
        return Ctr(values["clicks"], values["impressions"])

    def score_histogram(
        self, version: str, window_s: float, offset_s: float = 0.0
    ) -> dict[str, float] | None:
        """`le` -> cumulative count of the version's served top scores over the window;
        {} when it served none; None on failure."""
        result = self._vector(score_histogram_query(self.system_id, version, window_s, offset_s))
        if result is None:
            return None
        try:
            return {str(s["metric"]["le"]): float(s["value"][1]) for s in result}
        except (KeyError, IndexError, TypeError, ValueError):
            return None
