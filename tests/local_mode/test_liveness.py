"""The supervisor's liveness rules on their own: probes tell a frozen process from a
working one (real Redis and broker, frozen with SIGSTOP by the PID this test started),
a part is hung only after failed probes in a row, and the restart budget gives up a
crash loop but forgives a part that stayed healthy long enough."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from recsys_operator.launchers.probes import HttpProbe, TcpProbe
from recsys_operator.launchers.process import ManagedProcess, ProcessFailed, free_port
from recsys_operator.launchers.pulsar_broker import broker_process
from recsys_operator.launchers.redis_server import redis_process
from recsys_operator.local.liveness import PROBE_FAILURES, Liveness
from recsys_operator.local.parts import HEALTHY_RESET_S, MAX_RESTARTS, RestartBudget
from recsys_operator.local.report import Report
from recsys_operator.local.run_folder import RunFolder

TIMEOUT = 0.5


@pytest.fixture
def frozen_later(tmp_path: Path) -> Iterator[list[ManagedProcess]]:
    """Processes the test starts (and may SIGSTOP); resumed and stopped afterwards."""
    started: list[ManagedProcess] = []
    yield started
    for process in started:
        if process.alive():
            os.kill(process.pid or 0, signal.SIGCONT)
            process.stop()


@pytest.mark.redis
def test_redis_ping_fails_while_redis_is_frozen(
    tmp_path: Path, frozen_later: list[ManagedProcess]
) -> None:
    redis = redis_process(tmp_path).start()
    frozen_later.append(redis)
    assert redis.probe is not None
    assert redis.probe(redis.port, TIMEOUT) is None
    os.kill(redis.pid or 0, signal.SIGSTOP)
    problem = redis.probe(redis.port, TIMEOUT)
    assert problem is not None and "PING" in problem
    # A bare connect cannot tell: the kernel still accepts into the listen backlog.
    assert TcpProbe()(redis.port, TIMEOUT) is None
    os.kill(redis.pid or 0, signal.SIGCONT)
    assert redis.probe(redis.port, TIMEOUT) is None


@pytest.mark.broker
def test_the_broker_probe_sees_a_frozen_broker(
    tmp_path: Path, frozen_later: list[ManagedProcess]
) -> None:
    broker = broker_process(tmp_path).start()
    frozen_later.append(broker)
    assert broker.probe is not None
    assert broker.probe(broker.port, TIMEOUT) is None
    os.kill(broker.pid or 0, signal.SIGSTOP)
    assert broker.probe(broker.port, TIMEOUT) is not None
    os.kill(broker.pid or 0, signal.SIGCONT)
    assert broker.probe(broker.port, TIMEOUT) is None


def test_http_and_tcp_probes_name_a_closed_port() -> None:
    port = free_port()
    assert "GET /healthz" in (HttpProbe("/healthz")(port, TIMEOUT) or "")
    assert f"port {port}" in (TcpProbe()(port, TIMEOUT) or "")


@pytest.mark.redis
def test_a_part_is_hung_only_after_failed_probes_in_a_row(
    tmp_path: Path, frozen_later: list[ManagedProcess]
) -> None:
    redis = redis_process(tmp_path).start()
    frozen_later.append(redis)
    liveness = Liveness(timeout=TIMEOUT)
    assert liveness.hung("redis", redis) is None
    os.kill(redis.pid or 0, signal.SIGSTOP)
    verdicts = [liveness.hung("redis", redis) for _ in range(PROBE_FAILURES)]
    assert verdicts[:-1] == [None] * (PROBE_FAILURES - 1)
    assert verdicts[-1] is not None and f"{PROBE_FAILURES} probes in a row" in verdicts[-1]
    assert "redis" in liveness.unhealthy()
    # One good answer clears the count: slow moments do not add up to a hang.
    os.kill(redis.pid or 0, signal.SIGCONT)
    assert liveness.hung("redis", redis) is None and liveness.unhealthy() == {}
    os.kill(redis.pid or 0, signal.SIGSTOP)
    assert liveness.hung("redis", redis) is None  # first failure of a new run
    os.kill(redis.pid or 0, signal.SIGCONT)


def test_parts_without_a_probe_or_not_ready_are_not_judged(tmp_path: Path) -> None:
    never_started = ManagedProcess("x", ["true"], tmp_path / "x.log", free_port())
    never_started.probe = TcpProbe()
    liveness = Liveness(failures=1, timeout=TIMEOUT)
    assert liveness.hung("x", never_started) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def budget(clock: Clock) -> tuple[RestartBudget, list[tuple[str, str]]]:
    events: list[tuple[str, str]] = []

    def record(reason: str, message: str, **_: Any) -> None:
        events.append((reason, message))

    return RestartBudget(record, clock=clock), events


def test_a_crash_loop_is_given_up_once_and_for_good(tmp_path: Path) -> None:
    clock = Clock()
    restarts, events = budget(clock)
    allowed = []
    for _ in range(MAX_RESTARTS + 2):
        allowed.append(restarts.allow("gateway", "gateway exited", tmp_path / "g.log"))
        clock.now += 10
    assert allowed == [True] * MAX_RESTARTS + [False, False]
    assert [r for r, _ in events] == ["PartRestarted"] * MAX_RESTARTS + ["PartFailed"]
    assert "gateway" in restarts.given_up
    clock.now += 10 * HEALTHY_RESET_S  # a given-up part stays given up
    assert not restarts.allow("gateway", "gateway exited", tmp_path / "g.log")


def test_the_budget_starts_again_after_a_healthy_period(tmp_path: Path) -> None:
    clock = Clock()
    restarts, events = budget(clock)
    for _ in range(MAX_RESTARTS):
        assert restarts.allow("features", "features exited", tmp_path / "f.log")
        clock.now += 1
    clock.now += HEALTHY_RESET_S  # no restart for the healthy period
    assert restarts.allow("features", "features exited", tmp_path / "f.log")
    assert f"(1/{MAX_RESTARTS})" in events[-1][1]
    # Only a full healthy period counts: restarts closer together keep counting.
    for _ in range(MAX_RESTARTS - 1):
        clock.now += HEALTHY_RESET_S - 1
        assert restarts.allow("features", "features exited", tmp_path / "f.log")
    clock.now += HEALTHY_RESET_S - 1
    assert not restarts.allow("features", "features exited", tmp_path / "f.log")
    # Budgets are per part.
    assert restarts.allow("redis", "redis exited", tmp_path / "r.log")


def test_state_json_says_degraded_with_the_failed_part(tmp_path: Path) -> None:
    report = Report(RunFolder(tmp_path))
    report.phase = "running"
    gateway = ManagedProcess("gateway", ["true"], tmp_path / "g.log", free_port())
    healthy = report.document(
        system="s", desired_version="1", parts={"gateway": gateway},
        urls={}, topics={}, rollout=None,
    )  # fmt: skip
    assert healthy["degraded"] is False and healthy["failedParts"] == {}
    failed = report.document(
        system="s", desired_version="1", parts={"gateway": gateway},
        given_up={"gateway": "gateway exited with code 1 after 5 restarts"},
        urls={}, topics={}, rollout=None,
    )  # fmt: skip
    assert failed["degraded"] is True
    assert failed["parts"]["gateway"]["status"] == "failed"
    assert "after 5 restarts" in failed["failedParts"]["gateway"]


LISTENER = """
import socket, sys, time
servers = []
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    servers.append(s)
time.sleep(60)
"""


def listener(tmp_path: Path, listens: list[int], own: tuple[int, ...]) -> ManagedProcess:
    argv = [sys.executable, "-c", LISTENER, *map(str, listens)]
    process = ManagedProcess("listener", argv, tmp_path / "listener.log", listens[0])
    process.own_ports = own
    return process


def test_a_process_is_ready_once_it_holds_its_own_ports(
    tmp_path: Path, frozen_later: list[ManagedProcess]
) -> None:
    main, extra = free_port(), free_port()
    process = listener(tmp_path, [main, extra], (main, extra))
    frozen_later.append(process)
    process.start(ready_timeout=10)
    assert process.ready


def test_a_port_another_process_holds_is_reported_not_probed(
    tmp_path: Path, frozen_later: list[ManagedProcess]
) -> None:
    # What a free-port race does to pulsar-lite: its metrics listener fails, it runs on
    # without it, and a probe of that port would be answered by someone else.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        main = free_port()
        process = listener(tmp_path, [main], (main, taken))
        frozen_later.append(process)
        with pytest.raises(ProcessFailed, match=f"port {taken} on 127.0.0.1 is held by another"):
            process.start(ready_timeout=10)
        assert not process.alive()  # stopped, by its PID


def test_free_ports_are_below_the_ephemeral_range_and_free() -> None:
    """A port the kernel hands out for bind(0), or as the source port of an outgoing
    connection, comes from ip_local_port_range: one picked there could be taken before a
    slow server (TorchServe's JVM) binds it, which failed `recsys up` in CI."""
    start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert all(1024 <= port < start for port in ports), ports
    assert len(set(ports)) > 40  # random, not one port for every caller
    for port in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # free: binds
