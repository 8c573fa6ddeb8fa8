"""Gateway test fixtures: a serving stub and gateways on 127.0.0.1.

Gateways run in-process (`gateway.server.GatewayThread`, real HTTP on loopback), each
with its own metrics registry; `test_gateway_cli.py` also runs one as a subprocess.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from gateway_testing import StartGateway, write_routing
from serving_stub import ServingStub

from gateway.app import GatewaySettings
from gateway.server import GatewayThread


@pytest.fixture
def serving() -> Iterator[ServingStub]:
    stub = ServingStub().start()
    yield stub
    stub.stop()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[StartGateway]:
    """`start_gateway(routing_document, **settings)`: a started gateway; stopped after the test."""
    started: list[GatewayThread] = []

    def start(document: dict[str, Any], **settings: Any) -> GatewayThread:
        path = tmp_path / f"routing-{len(started)}.json"
        write_routing(path, document)
        gateway = GatewayThread(GatewaySettings(routing_path=path, **settings)).start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session
