"""A real redis-server on loopback, append-only persistence, for local mode and tests;
or a Redis Cluster of several of them (`redis_cluster`), each a primary of its share of
the 16384 hash slots, no replicas."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from recsys_operator.launchers.probes import RedisPing
from recsys_operator.launchers.process import (
    LOOPBACK,
    ManagedProcess,
    ProcessFailed,
    free_port,
)
from recsys_operator.tools import find_tool

CLUSTER_READY_TIMEOUT_S = 30.0


def redis_process(
    run_dir: Path, port: int | None = None, *, cluster: bool = False, name: str = "redis"
) -> ManagedProcess:
    """One redis-server; `cluster` starts it as a (not yet joined) Redis Cluster node."""
    port = port or free_port()
    data = run_dir / name
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        find_tool("redis-server"),
        "--bind",
        LOOPBACK,
        "--port",
        str(port),
        "--dir",
        str(data),
        "--save",
        "",
        *("--appendonly", "yes", "--appendfsync", "everysec"),  # survives kill -9
        "--protected-mode",
        "yes",
        "--daemonize",
        "no",
    ]
    if cluster:  # the node's view of the cluster lives in its own data folder
        argv += ["--cluster-enabled", "yes", "--cluster-config-file", str(data / "nodes.conf")]
        # The bus defaults to port + 10000, past 65535 for most free ports: name one.
        argv += ["--cluster-port", str(free_port())]
    return ManagedProcess(
        "redis-server", argv, run_dir / "logs" / f"{name}.log", port, probe=RedisPing()
    )


def redis_url(process: ManagedProcess, db: int = 0) -> str:
    return f"redis://{LOOPBACK}:{process.port}/{db}"


@dataclass
class RedisClusterProcesses:
    """The primaries of a loopback Redis Cluster, started and joined by `start`."""

    nodes: list[ManagedProcess]
    log_path: Path
    created: bool = field(default=False)

    @property
    def url(self) -> str:
        """A cluster endpoint (`recsys_contracts.store_endpoint`, mode cluster): any node."""
        return redis_url(self.nodes[0])

    def start(self, ready_timeout: float = CLUSTER_READY_TIMEOUT_S) -> RedisClusterProcesses:
        try:
            for node in self.nodes:
                node.start(ready_timeout)
            self.join(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def join(self, ready_timeout: float = CLUSTER_READY_TIMEOUT_S) -> None:
        """Once the nodes listen: assign the slots (the first time only: a restarted node
        finds the cluster in its nodes.conf) and wait until every node reports it ok."""
        if not self.created:
            self._create()
            self.created = True
        self._wait_ok(ready_timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def _create(self) -> None:
        argv = [
            find_tool("redis-cli"),
            "--cluster",
            "create",
            *(f"{LOOPBACK}:{node.port}" for node in self.nodes),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=60)
        if done.returncode != 0:
            raise ProcessFailed(f"redis-cli --cluster create failed; log {self.log_path}")

    def _wait_ok(self, timeout: float) -> None:
        """Until every node says cluster_state:ok (slots assigned and gossip settled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(_cluster_ok(node.port) for node in self.nodes):
                return
            time.sleep(0.1)
        raise ProcessFailed(f"the Redis Cluster did not reach cluster_state:ok in {timeout:.0f}s")


def redis_cluster(run_dir: Path, primaries: int = 3) -> RedisClusterProcesses:
    """A Redis Cluster of `primaries` loopback nodes (not started yet)."""
    nodes = [
        redis_process(run_dir, cluster=True, name=f"redis-cluster-{n}") for n in range(primaries)
    ]
    return RedisClusterProcesses(nodes, run_dir / "logs" / "redis-cluster-create.log")


def _cluster_ok(port: int) -> bool:
    argv = [find_tool("redis-cli"), "-h", LOOPBACK, "-p", str(port), "cluster", "info"]
    try:
        info = subprocess.run(argv, capture_output=True, timeout=5, check=False).stdout
    except subprocess.TimeoutExpired:
        return False
    return b"cluster_state:ok" in info
