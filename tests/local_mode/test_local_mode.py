"""`recsys up | status | rollout | down` on real parts, as a user runs them.

One small system (a model trained here on 300 synthetic items) is started once for
the module; the tests then steer it through the CLI and check what users rely on:
every part answers on 127.0.0.1, a broken canary is rolled back by the same state
machine the operator runs, a manual abort removes the canary, and `down` leaves no
process behind. Bounded: each command has a timeout and the simulation a duration.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from recsys_operator.local.parts import MAX_RESTARTS
from recsys_operator.local.report import DEGRADED_EXIT_CODE
from recsys_operator.local.run_folder import (
    RunFolder,
    process_start_time,
    same_process,
    signal_group,
)

pytestmark = [
    pytest.mark.java,
    pytest.mark.redis,
    pytest.mark.broker,
    pytest.mark.prometheus,
    pytest.mark.slow,
    pytest.mark.xdist_group("local-mode"),
]

MANIFEST: dict[str, Any] = {
    "apiVersion": "recsys.dev/v1alpha1",
    "kind": "RecommenderSystem",
    "metadata": {"name": "smoke", "namespace": "test"},
    "spec": {
        "events": {"topics": {"interactions": {"partitions": 1}, "impressions": {"partitions": 1}}},
        "model": {
            "name": "smoke",
            "version": "1",
            "embeddingDim": 8,
            "numItems": 300,
            "topK": 10,
            "index": {"type": "Flat"},
        },
        "serving": {"workers": 1, "batching": {"maxBatchSize": 8, "maxBatchDelayMs": 2}},
        "rollout": {
            "steps": [50, 100],
            "interval": "10s",
            "progressDeadline": "3m",
            "analysis": {
                "maxP99LatencyMs": 5000,
                "minImpressions": 120,
                "minCtrRatio": 0.8,
                "confidence": 0.95,
            },
        },
    },
}


def recsys(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recsys_operator.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for_state(folder: RunFolder, check: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = folder.read_state() or {}
        if check(state):
            return state
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached in {timeout:.0f}s; state: {json.dumps(state)[:3000]}")


def write_manifest(path: Path, **spec_changes: Any) -> Path:
    body = json.loads(json.dumps(MANIFEST))
    body["spec"].update(spec_changes)
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunFolder]:
    workdir = tmp_path_factory.mktemp("local")
    manifest = write_manifest(workdir / "smoke.yaml")
    folder = RunFolder(workdir / "run")
    result = recsys("up", "-f", str(manifest), "--run-dir", str(folder.root), cwd=workdir)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        yield folder
    finally:
        recsys("down", "--run-dir", str(folder.root), cwd=workdir, timeout=150)


def test_up_starts_every_part_on_loopback_and_serves(system: RunFolder) -> None:
    state = system.read_state()
    assert state is not None and state["phase"] == "running"
    assert set(state["parts"]) == {
        "pulsar", "redis", "torchserve-1", "features", "event-log", "gateway", "prometheus"
    }  # fmt: skip
    assert all(p["status"] == "running" for p in state["parts"].values()), state["parts"]
    assert all(url.split("//")[1].startswith("127.0.0.1:") for url in state["urls"].values())
    answer = requests.post(
        f"{state['urls']['gateway']}/v1/recommend", json={"user_id": "u0001", "k": 5}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == "1" and len(answer.json()["item_ids"]) == 5
    status = recsys("status", "--run-dir", str(system.root), cwd=system.root.parent)
    assert status.returncode == 0, status.stderr
    assert "torchserve-1" in status.stdout and "stable  1" in status.stdout


def test_events_reach_the_offline_event_log_in_the_run_folder(system: RunFolder) -> None:
    from recsys_contracts.event_log_layout import read_interactions

    state = system.read_state()
    assert state is not None
    gateway = state["urls"]["gateway"]
    answer = requests.post(f"{gateway}/v1/recommend", json={"user_id": "u0002", "k": 3}, timeout=10)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    click = {"type": "click", "user_id": "u0002", "item_id": body["item_ids"][0],
             "request_id": body["request_id"]}  # fmt: skip
    sent = requests.post(f"{gateway}/v1/events", json=click, timeout=10)
    assert sent.status_code in (200, 202), sent.text

    def logged() -> list[dict[str, Any]]:
        rows = read_interactions(str(system.event_log), 0, 10**14).to_pylist()
        return [r for r in rows if r["request_id"] == body["request_id"]]

    deadline = time.monotonic() + 30
    while not logged() and time.monotonic() < deadline:
        time.sleep(0.5)
    rows = logged()
    assert len(rows) == 1 and rows[0]["type"] == "click" and rows[0]["user_id"] == "u0002"


def test_a_part_that_dies_is_restarted_and_serving_goes_on(system: RunFolder) -> None:
    before = system.read_state()
    assert before is not None
    for name in ("gateway", "torchserve-1"):
        part = before["parts"][name]
        # Processes this test module started (via `recsys up`), by their recorded PID.
        assert signal_group(part["pid"], part["startTime"], signal.SIGKILL)

    def recovered(state: dict[str, Any]) -> bool:
        parts = state["parts"]
        return all(
            parts[name]["status"] == "running"
            and parts[name]["pid"] != before["parts"][name]["pid"]
            for name in ("gateway", "torchserve-1")
        )

    state = wait_for_state(system, recovered, 120, "gateway and TorchServe restarted")
    assert state["parts"]["gateway"]["port"] == before["parts"]["gateway"]["port"]
    restarted = [e["message"] for e in state["events"] if e["reason"] == "PartRestarted"]
    assert any("gateway" in m for m in restarted) and any("torchserve-1" in m for m in restarted)
    deadline = time.monotonic() + 30
    while True:
        # The new routing reaches the gateway within a second; until then a restarted
        # gateway without a learned fallback answers 503, or the fallback answers.
        response = requests.post(
            f"{state['urls']['gateway']}/v1/recommend", json={"user_id": "u0001"}, timeout=10
        )
        served = response.status_code == 200 and not response.json()["fallback"]
        if served or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert served, response.text
    assert response.json()["model_version"] == "1"


def test_a_broken_canary_is_rolled_back_on_ctr(system: RunFolder) -> None:
    from recsys_operator.local.simulation import SimulatedUsers

    started = recsys(
        "rollout", "start", "--version", "2", "--random-embeddings",
        "--run-dir", str(system.root), cwd=system.root.parent,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    wait_for_state(
        system,
        lambda s: (s["rollout"]["canary"] or {}).get("version") == "2",
        120,
        "canary of version 2 taking traffic",
    )
    users = SimulatedUsers(system, system.read_state()["urls"]["gateway"], rate=40, seed=5)
    stop = threading.Event()
    simulation = threading.Thread(target=users.run, args=(150, stop), daemon=True)
    simulation.start()
    try:
        state = wait_for_state(
            system,
            lambda s: (s["rollout"]["lastRollout"] or {}).get("version") == "2",
            150,
            "a decision on version 2",
        )
    finally:
        stop.set()
        simulation.join(timeout=15)
    record = state["rollout"]["lastRollout"]
    assert record["outcome"] == "RolledBack", record
    assert "significantly below" in record["reason"], record
    assert state["rollout"]["stableVersion"] == "1" and state["rollout"]["canary"] is None
    analysis = record["lastAnalysis"]
    assert analysis["canaryCtr"] < analysis["stableCtr"] and analysis["pValue"] < 0.05
    # Prometheus scraped the canary's model server too (it follows servers as they come).
    handler_metrics = requests.get(
        f"{state['urls']['prometheus']}/api/v1/query",
        params={"query": 'max_over_time(recsys_handler_latency_ms_count{model_version="2"}[5m])'},
        timeout=10,
    ).json()["data"]["result"]
    assert handler_metrics, "no handler metrics of the canary in Prometheus"
    # The canary's model server is stopped once traffic has left it.
    wait_for_state(system, lambda s: "torchserve-2" not in s["parts"], 120, "canary server stopped")
    routing = json.loads(system.routing.read_text())
    assert routing["canary"] is None and routing["stable"]["version"] == "1"


def test_up_with_a_new_version_starts_a_rollout_and_abort_ends_it(system: RunFolder) -> None:
    manifest = write_manifest(system.root.parent / "smoke-v3.yaml")
    body = yaml.safe_load(manifest.read_text())
    body["spec"]["model"]["version"] = "3"
    manifest.write_text(yaml.safe_dump(body))
    started = recsys(
        "up", "-f", str(manifest), "--run-dir", str(system.root), cwd=system.root.parent
    )
    assert started.returncode == 0, started.stdout + started.stderr
    assert "rollout of version 3 started" in started.stdout
    wait_for_state(
        system,
        lambda s: (s["rollout"]["canary"] or {}).get("weight") == 50,
        120,
        "canary of version 3 at 50%",
    )
    assert json.loads(system.routing.read_text())["canaryWeight"] == 50
    aborted = recsys("rollout", "abort", "--run-dir", str(system.root), cwd=system.root.parent)
    assert aborted.returncode == 0, aborted.stderr
    state = wait_for_state(
        system,
        lambda s: (s["rollout"]["lastRollout"] or {}).get("version") == "3",
        30,
        "the abort",
    )
    assert state["rollout"]["lastRollout"]["outcome"] == "Aborted"
    assert json.loads(system.routing.read_text())["canary"] is None


def test_a_failing_pre_rollout_webhook_rolls_back_before_any_traffic(system: RunFolder) -> None:
    """Local mode calls webhooks with the operator's code: the smoke test sees the canary's
    server up and routed nothing, and its refusal rolls the rollout back in its words."""
    import http.server

    received: list[dict[str, Any]] = []

    class Smoke(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            body = b'{"message": "canary answered 0 of 5 smoke users"}'
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Smoke)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rollout = {
            **MANIFEST["spec"]["rollout"],
            "webhooks": [
                {
                    "name": "smoke",
                    "type": "pre-rollout",
                    "url": f"http://127.0.0.1:{server.server_address[1]}/smoke",
                    "retries": 0,
                }
            ],
        }
        manifest = write_manifest(system.root.parent / "smoke-v4.yaml", rollout=rollout)
        body = yaml.safe_load(manifest.read_text())
        body["spec"]["model"]["version"] = "4"
        manifest.write_text(yaml.safe_dump(body))
        started = recsys(
            "up", "-f", str(manifest), "--run-dir", str(system.root), cwd=system.root.parent
        )
        assert started.returncode == 0, started.stdout + started.stderr
        state = wait_for_state(
            system,
            lambda s: (s["rollout"]["lastRollout"] or {}).get("version") == "4",
            180,
            "the rollback of version 4",
        )
    finally:
        server.shutdown()
        server.server_close()
    last = state["rollout"]["lastRollout"]
    assert last["outcome"] == "RolledBack"
    assert "pre-rollout webhook smoke failed" in last["reason"]
    assert "canary answered 0 of 5 smoke users" in last["reason"]
    assert [(r["canaryVersion"], r["canaryWeight"], r["phase"]) for r in received] == [
        ("4", 0, "PreRollout")
    ]
    assert json.loads(system.routing.read_text())["canary"] is None


def test_a_hung_gateway_is_restarted_by_its_probes(system: RunFolder) -> None:
    """A frozen process keeps its PID and its port: only the probes see it."""
    before = system.read_state()
    assert before is not None
    frozen = before["parts"]["gateway"]
    # The gateway this module's supervisor started, by its recorded PID.
    assert same_process(frozen["pid"], frozen["startTime"])
    os.kill(frozen["pid"], signal.SIGSTOP)
    try:
        state = wait_for_state(
            system,
            lambda s: (
                s["parts"]["gateway"]["pid"] != frozen["pid"]
                and s["parts"]["gateway"]["status"] == "running"
            ),
            60,
            "the frozen gateway restarted",
        )
    finally:
        if same_process(frozen["pid"], frozen["startTime"]):
            os.kill(frozen["pid"], signal.SIGCONT)
    assert not same_process(frozen["pid"], frozen["startTime"]), "the hung gateway was not killed"
    hung = [
        e["message"] for e in state["events"]
        if e["reason"] == "PartRestarted" and e["message"].startswith("gateway failed")
    ]  # fmt: skip
    assert hung and "probes in a row" in hung[-1], state["events"]
    assert state["parts"]["gateway"]["port"] == frozen["port"]
    answer = requests.post(
        f"{state['urls']['gateway']}/v1/recommend", json={"user_id": "u0001"}, timeout=10
    )
    assert answer.status_code == 200, answer.text


def still_running(pid: int, start_time: int) -> bool:
    """`pid` is the process we saw and not a zombie waiting for its reaper."""
    if not same_process(pid, start_time):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_dead_torchserve_launcher_has_its_jvm_killed_at_once(system: RunFolder) -> None:
    """The `torchserve` launcher dies, its JVM lives on: the supervisor kills the group
    at once rather than waiting for the JVM to leave."""
    before = system.read_state()
    assert before is not None
    launcher = before["parts"]["torchserve-1"]
    pid_file = system.root / "torchserve" / "1" / "tmp" / ".model_server.pid"
    jvm = int(pid_file.read_text().strip())
    jvm_start = process_start_time(jvm)
    assert jvm_start is not None and jvm != launcher["pid"]
    assert same_process(launcher["pid"], launcher["startTime"])
    os.kill(launcher["pid"], signal.SIGKILL)  # the launcher only, not its group
    killed_at = time.monotonic()
    while still_running(jvm, jvm_start) and time.monotonic() - killed_at < 30:
        time.sleep(0.2)
    gone_after = time.monotonic() - killed_at
    assert not still_running(jvm, jvm_start), "the JVM outlived its launcher by 30 s"
    # One tick to notice, then SIGKILL: not the ~20 s a graceful stop waited for it.
    assert gone_after < 8, f"the JVM was killed {gone_after:.1f}s after its launcher died"
    wait_for_state(
        system,
        lambda s: (
            s["parts"].get("torchserve-1", {}).get("status") == "running"
            and s["parts"]["torchserve-1"]["pid"] != launcher["pid"]
        ),
        180,
        "TorchServe restarted",
    )


def test_a_part_given_up_makes_status_say_degraded_and_fail(system: RunFolder) -> None:
    """Kill the gateway until its restart budget is spent: `recsys status` must not say
    all is well (it exits 4 and names the part)."""
    for _ in range(MAX_RESTARTS + 1):
        state = system.read_state()
        assert state is not None
        gateway = state["parts"]["gateway"]
        if gateway["status"] == "failed":
            break
        # The gateway this module's supervisor started, by its recorded PID.
        assert signal_group(gateway["pid"], gateway["startTime"], signal.SIGKILL)
        wait_for_state(
            system,
            lambda s, old=gateway["pid"]: (
                s["parts"]["gateway"]["status"] == "failed"
                or (
                    s["parts"]["gateway"]["pid"] != old
                    and s["parts"]["gateway"]["status"] == "running"
                )
            ),
            60,
            "the gateway restarted or given up",
        )
    state = wait_for_state(
        system, lambda s: s["parts"]["gateway"]["status"] == "failed", 10, "gateway given up"
    )
    assert state["degraded"] is True and "gateway" in state["failedParts"]
    assert any(e["reason"] == "PartFailed" for e in state["events"])
    status = recsys("status", "--run-dir", str(system.root), cwd=system.root.parent)
    assert status.returncode == DEGRADED_EXIT_CODE, status.stdout + status.stderr
    assert "DEGRADED" in status.stdout and "failed  gateway" in status.stdout
    as_json = recsys("status", "-o", "json", "--run-dir", str(system.root), cwd=system.root.parent)
    assert as_json.returncode == DEGRADED_EXIT_CODE
    assert json.loads(as_json.stdout)["degraded"] is True


def test_down_stops_every_process_it_started(system: RunFolder) -> None:
    state = system.read_state()
    assert state is not None
    processes = [(p["pid"], p["startTime"]) for p in state["parts"].values()]
    processes.append((state["supervisor"]["pid"], state["supervisor"]["startTime"]))
    result = recsys("down", "--run-dir", str(system.root), cwd=system.root.parent, timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [pid for pid, start in processes if same_process(pid, start)]
    assert (system.read_state() or {})["phase"] == "stopped"


def test_a_part_that_fails_to_start_is_reported_and_the_rest_stopped(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "broken.yaml")
    not_an_archive = tmp_path / "broken.mar"
    not_an_archive.write_text("this is not a model archive")
    folder = RunFolder(tmp_path / "run")
    result = recsys(
        "up", "-f", str(manifest), "--archive", str(not_an_archive),
        "--run-dir", str(folder.root), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "failed to start" in result.stderr and "torchserve" in result.stderr.lower()
    state = folder.read_state()
    assert state is not None and state["phase"] == "failed"
    assert not [
        name for name, p in state["parts"].items() if same_process(p["pid"], p["startTime"])
    ]


def test_an_invalid_manifest_is_refused_with_the_field_and_nothing_starts(tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path / "invalid.yaml", rollout={"steps": [50, 20], "interval": "10s"}
    )
    result = recsys("up", "-f", str(manifest), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 1
    assert "spec.rollout.steps" in result.stderr
    assert not (tmp_path / "run" / "state.json").exists()
