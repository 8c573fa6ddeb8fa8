"""The chart's Grafana dashboard: provisioned by a labelled ConfigMap, and every panel's
PromQL answered by a real Prometheus scraping a real gateway (with a serving stub
behind it) and the stream feature job's metrics."""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from gateway.app import GatewaySettings
from gateway.server import GatewayThread
from recsys_contracts import metric_names
from recsys_operator.launchers.process import ManagedProcess, free_port
from recsys_operator.launchers.prometheus import prometheus_process, prometheus_url
from recsys_operator.tools import find_tool
from stream_jobs.metrics import FeatureJobMetrics
from tests.gateway_http.serving_stub import ServingStub

pytestmark = pytest.mark.prometheus

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "recsys-operator"
DASHBOARD = CHART / "dashboards" / "recommender-system.json"
SYSTEM = "shop.recs"
RATE_WINDOW = "30s"  # what Grafana puts for $__rate_interval at a 1 s scrape, rounded up


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def test_the_dashboard_is_a_labelled_configmap_only_when_enabled() -> None:
    def render(*sets: str) -> list[dict[str, Any]]:
        argv = [find_tool("helm"), "template", "r", str(CHART)]
        for item in sets:
            argv += ["--set", item]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
        return [d for d in yaml.safe_load_all(out) if d and d["kind"] == "ConfigMap"]

    assert render() == []
    (configmap,) = render("dashboards.enabled=true")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["recommender-system.json"]) == json.loads(
        DASHBOARD.read_text()
    )


def test_every_panel_queries_metrics_the_components_export() -> None:
    known = {v for k, v in vars(metric_names).items() if k.isupper() and isinstance(v, str)}
    wanted = {
        "req/s": "recsys_gateway_requests_total",
        "latency": "recsys_gateway_request_duration_seconds_bucket",
        "CTR": "recsys_clicks_total",
        "events/s": "recsys_feature_events_total",
        "freshness": "recsys_feature_freshness_seconds_bucket",
        "backlog": "recsys_feature_consumer_backlog",
        "dead letters": "recsys_feature_dead_letters_total",
    }
    text = " ".join(expr for _, expr in panel_queries())
    for what, name in wanted.items():
        assert name in text, what
        assert name.removesuffix("_bucket") in known, name


@pytest.fixture
def fed_prometheus(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """(Prometheus URL, a function making one round of traffic) with Prometheus scraping
    the gateway and the feature job's metrics every second."""
    serving = ServingStub().start()
    routing = {
        "system": SYSTEM,
        "stable": {"version": "1", "url": serving.url("1")},
        "canary": {"version": "2", "url": serving.url("2")},
        "canaryWeight": 30,
        "salt": "recs:2",
        "timeoutMs": 1000,
        "defaultK": 5,
        "maxK": 20,
        "pulsarServiceUrl": None,
    }
    (tmp_path / "routing.json").write_text(json.dumps(routing))
    gateway = GatewayThread(GatewaySettings(routing_path=tmp_path / "routing.json")).start()
    features = FeatureJobMetrics()
    features_port = free_port()
    server = features.serve("127.0.0.1", features_port)
    # The feature job carries no `system` label: the ServiceMonitor adds it, as this does.
    targets = tmp_path / "targets.json"
    targets.write_text(
        json.dumps([{"targets": [f"127.0.0.1:{features_port}"], "labels": {"system": SYSTEM}}])
    )
    gateway_target = gateway.url.removeprefix("http://")
    prometheus: ManagedProcess = prometheus_process(
        tmp_path, [gateway_target], targets_file=targets
    ).start(ready_timeout=60)
    http = requests.Session()

    def traffic(round_: int) -> None:
        for n in range(20):
            body = http.post(
                f"{gateway.url}/v1/recommend", json={"user_id": f"u{round_}-{n}"}, timeout=10
            ).json()
            if n % 3 == 0:
                event = {
                    "type": "click",
                    "user_id": f"u{round_}-{n}",
                    "item_id": body["item_ids"][0],
                    "request_id": body["request_id"],
                }
                http.post(f"{gateway.url}/v1/events", json=[event], timeout=10)
        # What the feature job records per batch it applies.
        features.events.labels(type="click", outcome="applied").inc(7)
        features.dead_letters.labels(reason="malformed").inc()
        features.freshness.observe(0.2 + 0.01 * round_)
        features.backlog.labels(topic="interactions", subscription="features").set(40 - round_)

    try:
        yield prometheus_url(prometheus), traffic
    finally:
        prometheus.stop()
        server.shutdown()
        gateway.stop()
        serving.stop()


def test_every_panel_returns_data_from_a_real_prometheus(
    fed_prometheus: tuple[str, Any],
) -> None:
    url, traffic = fed_prometheus
    deadline = time.monotonic() + 60  # bounded: a round a second until every panel answers
    round_ = 0
    missing: list[str] = []
    while time.monotonic() < deadline:
        traffic(round_)
        round_ += 1
        time.sleep(1)
        if round_ < 5:
            continue
        missing = []
        for title, expr in panel_queries():
            query = expr.replace("$__rate_interval", RATE_WINDOW).replace("$system", SYSTEM)
            assert "$" not in query, query
            answer = requests.get(f"{url}/api/v1/query", params={"query": query}, timeout=10)
            assert answer.status_code == 200, (title, answer.text)  # it parses
            result = answer.json()["data"]["result"]
            values = [float(r["value"][1]) for r in result]
            if not values or not all(math.isfinite(v) for v in values):
                missing.append(f"{title}: {query} -> {result}")
        if not missing:
            break
    assert missing == [], missing
