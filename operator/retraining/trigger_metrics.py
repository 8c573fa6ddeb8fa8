"""What the triggers read from Prometheus: the stable version's CTR and its served-score histogram.

All series are the gateway's, selected by the system and the stable model version (any
variant: a version promoted from canary keeps the answers it served as one). Counters
and histogram buckets are read with `increase()` over a window ending `offset` seconds
ago, so a reading counts through restarts. Any failure (Prometheus unreachable, a bad
answer) is None: the trigger then decides nothing, it never fires on missing data.
"""

from __future__ import annotations

from dataclasses import dataclass

from recsys_contracts.metric_names import CLICKS, IMPRESSIONS, SERVED_TOP_SCORE
from recsys_operator.rollout.prometheus_reader import PrometheusReader, range_duration


def _range(window_s: float, offset_s: float) -> str:
    text = f"[{range_duration(window_s)}]"
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


class PrometheusTriggerMetrics:
    """The triggers' readings of one system from one Prometheus server."""

    def __init__(self, url: str, system_id: str, timeout_s: int = 5) -> None:
        # One attempt per query: a Prometheus that is down must not hold the timer.
        self.reader = PrometheusReader(url, timeout_s)
        self.system_id = system_id

    def ctr(self, version: str, window_s: float, offset_s: float = 0.0) -> Ctr | None:
        """The version's clicks and impressions over [now - offset - window, now - offset]."""
        # A `sum(...)` of no series is an empty vector: none of them, not "no answer".
        values = {
            name: self.reader.value(query, if_empty=0.0)
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
        query = score_histogram_query(self.system_id, version, window_s, offset_s)
        return self.reader.values_by("le", query)
