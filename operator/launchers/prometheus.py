"""A real Prometheus server on loopback scraping the given targets (local mode and tests).

Prometheus shows a first scrape only ~6 s after start even with a 1 s interval;
callers poll for the series they need rather than assume a delay.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from recsys_operator.launchers.probes import HttpProbe
from recsys_operator.launchers.process import LOOPBACK, ManagedProcess, free_port
from recsys_operator.tools import find_tool


def prometheus_config(
    targets: Sequence[str],
    scrape_interval: str = "1s",
    rule_files: Sequence[str] = (),
    targets_file: Path | None = None,
) -> str:
    """Scrape `targets`, plus whatever `targets_file` lists (Prometheus re-reads it, so
    targets that come and go, like a canary's model server, need no restart)."""
    job: dict[str, object] = {"job_name": "recsys", "static_configs": [{"targets": list(targets)}]}
    if targets_file is not None:
        job["file_sd_configs"] = [{"files": [str(targets_file)], "refresh_interval": "2s"}]
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [job],
    }
    if rule_files:
        config["rule_files"] = list(rule_files)
    return yaml.safe_dump(config, sort_keys=False)


def prometheus_process(
    run_dir: Path,
    targets: Sequence[str],
    *,
    scrape_interval: str = "1s",
    port: int | None = None,
    targets_file: Path | None = None,
) -> ManagedProcess:
    """`targets` are host:port pairs serving /metrics (on 127.0.0.1); `targets_file`, a
    file_sd JSON file of more that may change while Prometheus runs."""
    port = port or free_port()
    data = run_dir / "prometheus"
    data.mkdir(parents=True, exist_ok=True)
    config = data / "prometheus.yml"
    config.write_text(prometheus_config(targets, scrape_interval, targets_file=targets_file))
    argv = [
        find_tool("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={data / 'tsdb'}",
        f"--web.listen-address={LOOPBACK}:{port}",
        "--storage.tsdb.retention.time=1d",
        "--log.level=warn",
    ]
    return ManagedProcess(
        "prometheus",
        argv,
        run_dir / "logs" / "prometheus.log",
        port,
        # Liveness, not readiness: /-/ready answers 503 while a restart replays the WAL.
        probe=HttpProbe("/-/healthy"),
    )


def prometheus_url(process: ManagedProcess) -> str:
    return f"http://{LOOPBACK}:{process.port}"
