"""A real redis-server on loopback, append-only persistence, for local mode and tests."""

from __future__ import annotations

from pathlib import Path

from recsys_operator.launchers.probes import RedisPing
from recsys_operator.launchers.process import LOOPBACK, ManagedProcess, free_port
from recsys_operator.tools import find_tool


def redis_process(run_dir: Path, port: int | None = None) -> ManagedProcess:
    port = port or free_port()
    data = run_dir / "redis"
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
    return ManagedProcess(
        "redis-server", argv, run_dir / "logs" / "redis.log", port, probe=RedisPing()
    )


def redis_url(process: ManagedProcess, db: int = 0) -> str:
    return f"redis://{LOOPBACK}:{process.port}/{db}"
