"""The subscription backlog from the Pulsar admin API (answered here by a small
HTTP server on loopback that speaks the documented stats format)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from stream_support import wait_until

from stream_jobs.backlog import BacklogPoller, fetch_backlog, stats_paths, subscription_backlog

STATS = {
    "msgRateIn": 1.0,
    "subscriptions": {"features": {"msgBacklog": 1234, "type": "Key_Shared"}},
}


def test_stats_paths_name_partitioned_then_plain_stats() -> None:
    assert stats_paths("persistent://recsys/shop/interactions") == [
        "/admin/v2/persistent/recsys/shop/interactions/partitioned-stats",
        "/admin/v2/persistent/recsys/shop/interactions/stats",
    ]
    assert (
        stats_paths("interactions")[1] == "/admin/v2/persistent/public/default/interactions/stats"
    )


def test_the_backlog_of_our_subscription_is_read_from_stats() -> None:
    assert subscription_backlog(STATS, "features") == 1234
    assert subscription_backlog(STATS, "other") is None
    assert subscription_backlog({}, "features") is None


class AdminApi(BaseHTTPRequestHandler):
    """Knows one non-partitioned topic: partitioned-stats answers 404, as Pulsar does."""

    seen: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        AdminApi.seen.append((self.path, self.headers.get("Authorization")))
        if "/broken/" in self.path:
            self.send_error(500)
        elif self.path.endswith("/interactions/stats"):
            body = json.dumps(STATS).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def admin_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), AdminApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    AdminApi.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(5)


def test_fetch_falls_back_to_plain_stats_and_sends_the_token(admin_url: str) -> None:
    topic = "persistent://recsys/shop/interactions"
    assert fetch_backlog(admin_url, topic, "features", "jwt") == 1234
    assert [path.rsplit("/", 1)[1] for path, _ in AdminApi.seen] == ["partitioned-stats", "stats"]
    assert all(auth == "Bearer jwt" for _, auth in AdminApi.seen)


def test_the_poller_reports_until_stopped(admin_url: str) -> None:
    reported: list[int] = []
    poller = BacklogPoller(
        admin_url,
        "persistent://recsys/shop/interactions",
        "features",
        None,
        reported.append,
        interval=0.05,
    ).start()
    wait_until(lambda: len(reported) >= 2, 10, "two backlog reports")
    poller.stop()
    assert set(reported) == {1234}


def test_a_failing_admin_api_never_stops_the_poller(admin_url: str) -> None:
    reported: list[int] = []
    topic = "persistent://recsys/broken/interactions"
    poller = BacklogPoller(
        admin_url, topic, "features", None, reported.append, interval=0.05
    ).start()
    wait_until(lambda: len(AdminApi.seen) >= 3, 10, "polls continuing after server errors")
    poller.stop()
    assert reported == []
