"""The pulsar-lite broker (a Pulsar-protocol broker in one binary) on loopback.

Partitioned topics exist only through `default_partitions` in its TOML config,
and its metrics port defaults to 0.0.0.0:8080, so it is always given a config
that binds both listeners to 127.0.0.1 (see DESIGN.md, known facts).
"""

from __future__ import annotations

from pathlib import Path

from recsys_operator.launchers.probes import HttpProbe
from recsys_operator.launchers.process import LOOPBACK, ManagedProcess, free_port
from recsys_operator.tools import find_tool


def broker_config(db_path: Path, port: int, metrics_port: int, default_partitions: int) -> str:
    return (
        f'addr = "{LOOPBACK}:{port}"\n'
        f'db_path = "{db_path}"\n'
        f"default_partitions = {default_partitions}\n"
        'log_level = "warn"\n'
        "\n[metrics]\n"
        "enabled = true\n"
        f'addr = "{LOOPBACK}:{metrics_port}"\n'
    )


def broker_process(
    run_dir: Path, *, default_partitions: int = 1, port: int | None = None
) -> ManagedProcess:
    """A fresh broker whose data lives under `run_dir/pulsar`."""
    port = port or free_port()
    metrics_port = free_port()
    # Absolute: the broker runs in its data folder, and given a config path it cannot
    # open it silently falls back to its defaults, which listen on 0.0.0.0.
    data = run_dir.resolve() / "pulsar"
    data.mkdir(parents=True, exist_ok=True)
    config = data / "pulsar-lite.toml"
    config.write_text(broker_config(data / "db", port, metrics_port, default_partitions))
    argv = [find_tool("pulsar-lite"), "--config", str(config)]
    process = ManagedProcess(
        "pulsar-lite", argv, run_dir / "logs" / "pulsar-lite.log", port, cwd=data
    )
    process.env = {"RUST_LOG": "warn"}
    # Its metrics listener answers HTTP: unlike a bare connect it tells a frozen broker.
    process.probe = HttpProbe("/metrics", port=metrics_port)
    process.own_ports = (port, metrics_port)
    return process


def service_url(process: ManagedProcess) -> str:
    return f"pulsar://{LOOPBACK}:{process.port}"
