"""TorchServe as a local process on 127.0.0.1, configured exactly as in a cluster.

The three configuration files come from `recsys_operator.render.torchserve_config`
and are written to `<run_dir>/config/`. TorchServe runs in the foreground (`--start
--foreground`), so the PID we hold is the launcher whose process group holds the JVM
and its Python workers; `--ncs` keeps it from writing config snapshots.

TorchServe keeps a PID file in the temporary folder (`$TMPDIR/.model_server.pid`) and
refuses to start while another server's PID is in it, and its workers' sockets live in
the JVM's temporary folder. Each server therefore gets its own `TMPDIR` and `TEMP`
(which the launcher turns into `-Djava.io.tmpdir`), so several servers can run at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys_operator.api.recommender_system import ModelSpec, ServingSpec
from recsys_operator.launchers.probes import HttpProbe
from recsys_operator.launchers.process import (
    LOOPBACK,
    ManagedProcess,
    ProcessFailed,
    free_port,
    log_tail,
)
from recsys_operator.render.torchserve_config import (
    CONFIG_PROPERTIES,
    LOG4J2_XML,
    METRICS_YAML,
    TorchServePorts,
    render_config_properties,
    render_log4j2_xml,
    render_metrics_yaml,
)
from recsys_operator.tools import ToolNotFound, find_tool

PID_FILE = ".model_server.pid"
"""Where the torchserve launcher records the JVM's PID, in its temporary folder."""


def free_ports() -> TorchServePorts:
    return TorchServePorts(
        inference=free_port(),
        management=free_port(),
        metrics=free_port(),
        grpc_inference=free_port(),
        grpc_management=free_port(),
    )


def torchserve_executable() -> str:
    """The `torchserve` launcher of this Python environment (its workers use this Python)."""
    beside = Path(sys.executable).with_name("torchserve")
    if beside.is_file():
        return str(beside)
    found = shutil.which("torchserve")
    if not found:
        raise ToolNotFound(
            "torchserve not found next to this Python or on PATH; pip install torchserve"
        )
    return found


@dataclass
class LocalTorchServe:
    """A started (or startable) TorchServe and how to reach it."""

    process: ManagedProcess
    ports: TorchServePorts
    model_name: str
    versions: list[str]
    config_dir: Path
    tmp_dir: Path

    @property
    def inference_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.management}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.metrics}/metrics"

    def predictions_url(self, version: str | None = None) -> str:
        suffix = f"/{version}" if version else ""
        return f"{self.inference_url}/predictions/{self.model_name}{suffix}"

    def start(self, timeout: float = 120.0) -> LocalTorchServe:
        """Start and wait until every version has a ready worker."""
        deadline = time.monotonic() + timeout
        # A PID file left by an earlier server in this folder would block the start.
        (self.tmp_dir / PID_FILE).unlink(missing_ok=True)
        self.process.start(ready_timeout=timeout)
        self.process.ready = False  # the port answers before the models have workers
        try:
            for version in self.versions:
                self.wait_for_workers(version, deadline - time.monotonic())
        except ProcessFailed:
            self.stop()
            raise
        self.process.ready = True
        return self

    def stop(self, grace: float = 20.0) -> None:
        """Stop the launcher, the JVM and the workers: the whole process group we started.

        `ManagedProcess.stop` waits for the launcher only; the JVM shuts its workers
        down after it, and a new server in the same folder would find its PID file."""
        group = self.process.pid
        self.process.stop(grace=grace)
        if group is None:
            return
        deadline = time.monotonic() + grace
        try:
            while time.monotonic() < deadline:
                os.killpg(group, 0)  # raises once no process of the group is left
                time.sleep(0.1)
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group at once, for a server that is hung or whose launcher
        died (the JVM would outlive it, and `stop` would wait `grace` for nothing)."""
        group = self.process.pid
        self.process.kill()
        if group is None:
            return
        deadline = time.monotonic() + 5.0
        try:
            while time.monotonic() < deadline:
                os.killpg(group, 0)  # raises once no process of the group is left
                time.sleep(0.05)
        except ProcessLookupError:
            pass

    def describe(self, version: str) -> dict[str, Any]:
        """The management API's description of one model version."""
        url = f"{self.management_url}/models/{self.model_name}/{version}"
        with urllib.request.urlopen(url, timeout=5) as response:
            described: list[dict[str, Any]] = json.load(response)
        return described[0]

    def worker_pids(self, version: str, *, ready_only: bool = True) -> list[int]:
        workers = self.describe(version).get("workers", [])
        return [
            int(w["pid"])
            for w in workers
            if w.get("pid") and (not ready_only or w.get("status") == "READY")
        ]

    def wait_for_workers(self, version: str, timeout: float) -> list[int]:
        """PIDs of the version's ready workers, once there are as many as configured."""
        deadline = time.monotonic() + max(timeout, 0.0)
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise ProcessFailed(
                    f"TorchServe exited; log {self.process.log_path}:\n{log_tail(self.process.log_path)}"
                )
            try:
                description = self.describe(version)
                ready = [w for w in description.get("workers", []) if w.get("status") == "READY"]
                if ready and len(ready) >= int(description.get("minWorkers", 1)):
                    return [int(w["pid"]) for w in ready]
                last = f"workers: {[w.get('status') for w in description.get('workers', [])]}"
            except (urllib.error.URLError, OSError, ValueError, IndexError) as exc:
                last = str(exc)
            time.sleep(0.2)
        raise ProcessFailed(
            f"TorchServe model {self.model_name}/{version} had no ready worker in time ({last}); "
            f"log {self.process.log_path}:\n{log_tail(self.process.log_path, 60)}"
        )


def torchserve_server(
    run_dir: Path,
    *,
    model: ModelSpec,
    serving: ServingSpec,
    model_store: Path,
    versions: Sequence[str] | None = None,
    ports: TorchServePorts | None = None,
    env: Mapping[str, str] | None = None,
    memory_limit: str | int | None = None,
    log_level: str = "warn",
) -> LocalTorchServe:
    """A TorchServe on 127.0.0.1 serving `<model_store>/<name>-<version>.mar` for each
    version, configured by the renderer; `env` reaches the handler (RECSYS_* settings).
    Call `.start()` on the result."""
    find_tool("java")
    run_dir = run_dir.resolve()
    config_dir = run_dir / "config"
    tmp_dir = run_dir / "tmp"
    for folder in (config_dir, tmp_dir):
        folder.mkdir(parents=True, exist_ok=True)
    ports = ports or free_ports()
    versions = list(versions or [model.version])
    (config_dir / CONFIG_PROPERTIES).write_text(
        render_config_properties(
            model,
            serving,
            versions=versions,
            ports=ports,
            bind_address=LOOPBACK,
            model_store=str(model_store.resolve()),
            config_dir=str(config_dir),
            memory_limit=memory_limit,
        )
    )
    (config_dir / LOG4J2_XML).write_text(render_log4j2_xml(level=log_level))
    (config_dir / METRICS_YAML).write_text(render_metrics_yaml())
    argv = [
        torchserve_executable(),
        "--start",
        "--foreground",
        "--ncs",
        "--ts-config", str(config_dir / CONFIG_PROPERTIES),
        "--model-store", str(model_store.resolve()),
    ]  # fmt: skip
    process = ManagedProcess(
        "torchserve",
        argv,
        run_dir / "logs" / "torchserve.log",
        ports.inference,
        cwd=run_dir,
        env={**(env or {}), "TMPDIR": str(tmp_dir), "TEMP": str(tmp_dir)},
        # /ping answers 500 while TorchServe restarts a crashed worker itself; only a
        # server that does not answer at all (a frozen JVM) is restarted whole.
        probe=HttpProbe("/ping", any_status=True),
    )
    return LocalTorchServe(process, ports, model.name, versions, config_dir, tmp_dir)
