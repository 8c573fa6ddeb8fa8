"""Shared fixtures: real parts started on 127.0.0.1, one per test session.

Each fixture fails (never skips) when its binary is missing: `make test` runs
scripts/setup.sh first, which installs them. Deselect by marker to run without
them, e.g. `pytest -m "not java"`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys_operator.launchers.process import ManagedProcess
from recsys_operator.launchers.pulsar_broker import broker_process
from recsys_operator.launchers.redis_server import (
    RedisClusterProcesses,
    redis_cluster,
    redis_process,
)
from recsys_operator.tools import ToolNotFound

pytest_plugins = ["kubemock.fixtures"]  # the Kubernetes and Pulsar admin emulators

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for logs and data of the processes this test session starts."""
    return tmp_path_factory.mktemp("run")


def _start(make: object) -> ManagedProcess:
    try:
        return make()  # type: ignore[operator, no-any-return]
    except ToolNotFound as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def redis_server(session_dir: Path) -> Iterator[ManagedProcess]:
    """A real redis-server on loopback for the whole session (flush per test as needed)."""
    process = _start(lambda: redis_process(session_dir).start())
    yield process
    process.stop()


@pytest.fixture(scope="session")
def pulsar_broker(session_dir: Path) -> Iterator[ManagedProcess]:
    """A fresh pulsar-lite broker for the whole session; topics have 2 partitions."""
    process = _start(lambda: broker_process(session_dir, default_partitions=2).start())
    yield process
    process.stop()


@pytest.fixture(scope="session")
def redis_cluster_nodes(session_dir: Path) -> Iterator[RedisClusterProcesses]:
    """A real 3-primary Redis Cluster on loopback (`redis-cli --cluster create`, no
    replicas), up once cluster_state is ok on every node; stopped by PID at the end."""
    cluster = redis_cluster(session_dir / "cluster", primaries=3)
    try:
        cluster.start()
    except ToolNotFound as exc:
        pytest.fail(str(exc))
    yield cluster
    cluster.stop()
