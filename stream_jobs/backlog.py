"""The subscription backlog, read from the Pulsar admin REST API for the metrics.

The Pulsar client cannot tell a consumer its backlog, so where an admin URL is
configured a background thread asks the broker every `interval` seconds
(`GET /admin/v2/persistent/<tenant>/<namespace>/<topic>/partitioned-stats`, then
`/stats` for a topic that is not partitioned) and sets a gauge. Without an admin
URL (pulsar-lite has no admin API) the gauge is simply absent.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def stats_paths(topic: str) -> list[str]:
    """Admin API paths of `topic`'s stats: partitioned first, then plain."""
    scheme, _, rest = topic.partition("://")
    if not rest:  # a short name such as "interactions" lives in public/default
        scheme, rest = "persistent", f"public/default/{topic}"
    base = f"/admin/v2/{scheme}/{rest}"
    return [f"{base}/partitioned-stats", f"{base}/stats"]


def subscription_backlog(stats: dict[str, Any], subscription: str) -> int | None:
    """`msgBacklog` of `subscription` in a stats document, or None when it is not there."""
    entry = stats.get("subscriptions", {}).get(subscription)
    if not isinstance(entry, dict) or "msgBacklog" not in entry:
        return None
    return int(entry["msgBacklog"])


def fetch_backlog(admin_url: str, topic: str, subscription: str, token: str | None) -> int | None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for path in stats_paths(topic):
        request = urllib.request.Request(admin_url.rstrip("/") + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return subscription_backlog(json.load(response), subscription)
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 409):  # not partitioned: try the plain stats
                continue
            raise
    return None


class BacklogPoller:
    """Calls `report(backlog)` every `interval` seconds until stopped."""

    def __init__(
        self,
        admin_url: str,
        topic: str,
        subscription: str,
        token: str | None,
        report: Callable[[int], None],
        interval: float = 15.0,
    ) -> None:
        self._args = (admin_url, topic, subscription, token)
        self._report = report
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backlog-poller", daemon=True)

    def start(self) -> BacklogPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                backlog = fetch_backlog(*self._args)
                if backlog is not None:
                    self._report(backlog)
            except (OSError, ValueError) as exc:  # a metric must never stop the job
                log.warning("cannot read the subscription backlog: %s", exc)
            self._stop.wait(self._interval)
