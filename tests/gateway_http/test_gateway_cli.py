"""`recsys gateway run` / `python -m gateway run`: a process of its own."""

from __future__ import annotations

import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import typer
from gateway_testing import metric_value, routing_document, wait_until, write_routing
from serving_stub import Behaviour, ServingStub
from typer.testing import CliRunner

from gateway.cli import gateway_app, register
from gateway.server import ADDRESS_ENV, listen_address
from recsys_contracts.metric_names import GATEWAY_IN_FLIGHT
from recsys_operator.launchers.process import ManagedProcess, free_port


def test_the_gateway_runs_as_a_process_and_stops_on_sigterm(
    serving: ServingStub, tmp_path: Path, http: requests.Session
) -> None:
    routing = tmp_path / "routing.json"
    write_routing(routing, routing_document(serving))
    port = free_port()
    process = ManagedProcess(
        "gateway",
        [sys.executable, "-m", "gateway", "run", "--routing", str(routing)],
        tmp_path / "gateway.log",
        port,
        # The Kubernetes manifest's way of setting the address (there 0.0.0.0:8000).
        env={ADDRESS_ENV: f"127.0.0.1:{port}"},
    )
    process.start(ready_timeout=30)
    try:
        url = f"http://127.0.0.1:{port}"
        assert http.get(f"{url}/healthz", timeout=10).json()["stable_version"] == "1"
        answer = http.post(f"{url}/v1/recommend", json={"user_id": "u1", "k": 2}, timeout=10)
        assert answer.status_code == 200 and len(answer.json()["item_ids"]) == 2
    finally:
        assert process.popen is not None
        process.popen.send_signal(signal.SIGTERM)
        assert process.popen.wait(timeout=30) == 0
    assert "gateway for shop.recs on http://127.0.0.1" in process.log_path.read_text()


def test_sigterm_lets_the_request_in_flight_finish_before_exiting(
    serving: ServingStub, tmp_path: Path
) -> None:
    routing = tmp_path / "routing.json"
    write_routing(routing, routing_document(serving, timeout_ms=5000))
    serving.behaviour["1"] = Behaviour(delay_s=1.0)
    port = free_port()
    process = ManagedProcess(
        "gateway",
        [sys.executable, "-m", "gateway", "run", "--routing", str(routing), "--port", str(port)],
        tmp_path / "gateway.log",
        port,
    )
    process.start(ready_timeout=30)
    assert process.popen is not None
    url = f"http://127.0.0.1:{port}"
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            requests.post,
            f"{url}/v1/recommend",
            json={"user_id": "u1", "k": 2},
            timeout=10,
        )
        # The gateway is waiting for the model (which takes a second) when it is told to stop.
        wait_until(
            lambda: (
                metric_value(requests.get(f"{url}/metrics", timeout=10).text, GATEWAY_IN_FLIGHT)
                == 1
            )
        )
        process.popen.send_signal(signal.SIGTERM)
        answer = in_flight.result(timeout=10)
    assert answer.status_code == 200 and not answer.json()["fallback"]
    assert answer.headers["Connection"] == "close"
    assert process.popen.wait(timeout=30) == 0


def test_a_missing_routing_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    result = CliRunner().invoke(gateway_app, ["run", "--routing", str(missing)])
    assert result.exit_code == 2
    assert "cannot read" in result.output and "nope.json" in result.output


def test_register_adds_the_command_to_the_root_cli() -> None:
    root = typer.Typer()

    @root.command()
    def version() -> None:
        """Another command, as the real root has."""

    register(root)
    result = CliRunner().invoke(root, ["gateway", "run", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--routing", "--port", "--host", "--fallback-items"):
        assert option in result.output


def test_the_listen_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    assert listen_address(None, None) == ("127.0.0.1", 8000)
    monkeypatch.setenv(ADDRESS_ENV, "0.0.0.0:8000")
    assert listen_address(None, None) == ("0.0.0.0", 8000)
    assert listen_address("127.0.0.1", 9000) == ("127.0.0.1", 9000)  # options win
    monkeypatch.setenv(ADDRESS_ENV, "8000")
    with pytest.raises(ValueError, match=ADDRESS_ENV):
        listen_address(None, None)
