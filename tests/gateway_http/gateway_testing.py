"""Helpers of the gateway tests: routing files, polling with a deadline, metrics."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from serving_stub import ServingStub

from gateway.server import GatewayThread

SYSTEM = "shop.recs"

# The `start_gateway` fixture: `start_gateway(routing_document, **settings)`. Kept here,
# not in conftest.py: several test folders have a conftest, so `import conftest` is
# ambiguous.
StartGateway = Callable[..., GatewayThread]


def routing_document(
    serving: ServingStub,
    *,
    stable: str = "1",
    canary: str | None = None,
    weight: int = 0,
    salt: str = "recs:1",
    # Generous: the suite shares two cores, and a test that means a timeout sets its own.
    timeout_ms: int = 1000,
    default_k: int = 10,
    max_k: int = 50,
    pulsar: str | None = None,
    topics: tuple[str, str] = ("persistent://public/default/i", "persistent://public/default/m"),
) -> dict[str, Any]:
    """A routing file as `recsys_operator.render.gateway.gateway_routing` writes it."""
    return {
        "system": SYSTEM,
        "stable": {"version": stable, "url": serving.url(stable)},
        "canary": {"version": canary, "url": serving.url(canary)} if canary else None,
        "canaryWeight": weight if canary else 0,
        "salt": salt,
        "timeoutMs": timeout_ms,
        "defaultK": default_k,
        "maxK": max_k,
        "pulsarServiceUrl": pulsar,
        "interactionsTopic": topics[0],
        "impressionsTopic": topics[1],
    }


def write_routing(path: Path, document: dict[str, Any]) -> None:
    """Replace the file atomically, as the kubelet swaps a ConfigMap volume."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(document, indent=2))
    os.replace(partial, path)


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
