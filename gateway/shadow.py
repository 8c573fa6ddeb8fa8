"""Shadow traffic: the canary answers mirrored requests that users never see.

While a rollout is in its Shadow phase the routing carries `shadowPercent`: that share
of recommendation requests answered by the stable is sent again, after the user has
the stable's answer, to the canary. The two lists are compared as they arrive, and
the comparison is what the rollout's shadow analysis reads from Prometheus:

- **overlap**: the share of the stable's items that the canary also recommends
  (|stable ∩ canary| / |stable|), a check that the canary ranks the same catalogue
  sensibly (a broken index or a stale embedding table gives ~0);
- **predicted CTR** of each list: the mean, over its items, of the item's
  click-through rate as observed on the stable's real answers and clicks
  (`ItemCtr`), items never shown counting at the overall rate. A coarse off-policy
  estimate: it favours items the stable already shows, so it guards against a much
  worse canary and is no substitute for the canary analysis on real traffic.

Mirrored calls are bounded (`MAX_IN_FLIGHT`); beyond that, requests are not mirrored
(counted as `skipped`), so the shadow never slows down or queues user traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.metrics import GatewayMetrics
from gateway.routing import Routing
from gateway.upstream import ServingClient, ServingRejected, ServingUnavailable

MAX_IN_FLIGHT = 64
MAX_TRACKED_ITEMS = 100_000  # beyond this, new items count at the overall rate
PRIOR_IMPRESSIONS = 20.0  # strength of the pull of a rarely shown item towards the overall rate


@dataclass
class ItemCtr:
    """Per-item impressions and clicks on the stable's answers (bounded)."""

    impressions: dict[str, int] = field(default_factory=dict)
    clicks: dict[str, int] = field(default_factory=dict)
    total_impressions: int = 0
    total_clicks: int = 0

    def shown(self, item_ids: Iterable[str]) -> None:
        for item in item_ids:
            self.total_impressions += 1
            if item in self.impressions or len(self.impressions) < MAX_TRACKED_ITEMS:
                self.impressions[item] = self.impressions.get(item, 0) + 1

    def clicked(self, item_id: str) -> None:
        self.total_clicks += 1
        if item_id in self.impressions:
            self.clicks[item_id] = self.clicks.get(item_id, 0) + 1

    @property
    def overall(self) -> float:
        return self.total_clicks / self.total_impressions if self.total_impressions else 0.0

    def predicted(self, item_ids: list[str]) -> float:
        """The mean estimated CTR of the list's items (0 for an empty list)."""
        if not item_ids:
            return 0.0
        prior = self.overall
        total = 0.0
        for item in item_ids:
            shown = self.impressions.get(item, 0)
            total += (self.clicks.get(item, 0) + PRIOR_IMPRESSIONS * prior) / (
                shown + PRIOR_IMPRESSIONS
            )
        return total / len(item_ids)


def overlap(stable: list[str], canary: list[str]) -> float:
    """The share of the stable's items the canary also recommends."""
    if not stable:
        return 1.0 if not canary else 0.0
    return len(set(stable) & set(canary)) / len(set(stable))


class Shadow:
    """Mirrors requests to the canary and records the comparisons in the metrics."""

    def __init__(self, metrics: GatewayMetrics, serving: ServingClient) -> None:
        self.metrics = metrics
        self.serving = serving
        self.items = ItemCtr()
        self._tasks: set[asyncio.Task[None]] = set()

    def mirror(self, routing: Routing, request: dict[str, Any], stable_items: list[str]) -> None:
        """Send `request` to the canary in the background, if the routing asks for it."""
        canary = routing.canary
        if canary is None or routing.shadow_percent <= 0:
            return
        if random.random() * 100 >= routing.shadow_percent:
            return
        labels = (routing.system, canary.version)
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.metrics.shadow_requests.labels(*labels, "skipped").inc()
            return
        task = asyncio.create_task(self._compare(routing, request, list(stable_items)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare(
        self, routing: Routing, request: dict[str, Any], stable_items: list[str]
    ) -> None:
        assert routing.canary is not None
        labels = (routing.system, routing.canary.version)
        try:
            answer = await self.serving.recommend(
                routing.canary.url, request, routing.timeout_ms / 1000
            )
        except (ServingUnavailable, ServingRejected):
            self.metrics.shadow_requests.labels(*labels, "failed").inc()
            return
        canary_items = answer.item_ids[: request["k"]]
        self.metrics.shadow_requests.labels(*labels, "compared").inc()
        self.metrics.shadow_overlap.labels(*labels).observe(overlap(stable_items, canary_items))
        self.metrics.shadow_predicted_ctr.labels(*labels, "stable").observe(
            self.items.predicted(stable_items)
        )
        self.metrics.shadow_predicted_ctr.labels(*labels, "canary").observe(
            self.items.predicted(canary_items)
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
