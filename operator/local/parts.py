"""The processes of a local system: started in order, restarted when they die or hang
(as a kubelet would, on the same port, so every URL stays valid), stopped in reverse.

The model servers are started by the router (`traffic.ModelServers`), one per served
version; a dead one is restarted here too, on new ports, and the routing follows.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from recsys_contracts.env_vars import GatewayEnv
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.launchers.probes import HttpProbe
from recsys_operator.launchers.process import LOOPBACK, ManagedProcess, ProcessFailed, free_port
from recsys_operator.local.desired_state import plain_env
from recsys_operator.local.liveness import Liveness
from recsys_operator.local.run_folder import RunFolder
from recsys_operator.local.traffic import ModelServers, Say
from recsys_operator.render.features import feature_job_env
from recsys_operator.render.naming import TOPIC_NAMES, system_id, topic_url

log = logging.getLogger("recsys.local")

START_TIMEOUT_S = 60.0
# pulsar-lite may stop feeding one partition to a Shared consumer until it resubscribes.
RESUBSCRIBE_IDLE = "10s"
MAX_RESTARTS = 5
HEALTHY_RESET_S = 300.0
"""A part that ran this long since its last restart has its count of restarts cleared:
five crashes in a week are not a crash loop."""


class RestartBudget:
    """At most MAX_RESTARTS restarts per part within a crash loop, each one an event; the
    count starts again after HEALTHY_RESET_S without a restart. A part past its budget is
    given up for good (left stopped until the next `recsys up`)."""

    def __init__(self, record: Say, clock: Callable[[], float] = time.monotonic) -> None:
        self._record = record
        self._clock = clock
        self._restarts: dict[str, tuple[int, float]] = {}
        """Part -> (restarts in the current loop, when the last one was)."""
        self.given_up: dict[str, str] = {}
        """Parts past MAX_RESTARTS, with why: reported once, then left stopped."""

    def allow(self, name: str, what: str, log_path: Path) -> bool:
        """Count one more restart of `name` and say so; past MAX_RESTARTS, say once that
        it stays stopped and return False."""
        if name in self.given_up:
            return False
        restarts, last = self._restarts.get(name, (0, 0.0))
        now = self._clock()
        if restarts and now - last >= HEALTHY_RESET_S:
            restarts = 0  # healthy long enough: this failure starts a new count
        if restarts >= MAX_RESTARTS:
            self.given_up[name] = f"{what} after {restarts} restarts"
            self._record(
                "PartFailed",
                f"{what} after {restarts} restarts; left stopped, log {log_path}",
                warning=True,
            )
            return False
        self._restarts[name] = (restarts + 1, now)
        self._record(
            "PartRestarted",
            f"{what}; restarting ({restarts + 1}/{MAX_RESTARTS}), log {log_path}",
            warning=True,
        )
        return True


class Parts:
    """Every process of the local system, by name (model servers as torchserve-<version>)."""

    def __init__(
        self,
        folder: RunFolder,
        servers: ModelServers,
        record: Say,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.folder = folder
        self.servers = servers
        self.processes: dict[str, ManagedProcess] = {}
        self._record = record
        self._on_change = on_change
        self._budget = RestartBudget(record)
        self.liveness = Liveness()

    @property
    def given_up(self) -> dict[str, str]:
        """Parts past their restart budget, left stopped, with why."""
        return dict(self._budget.given_up)

    def all(self) -> dict[str, ManagedProcess]:
        parts = dict(self.processes)
        for version, server in self.servers.by_version.items():
            parts[f"torchserve-{version}"] = server.process
        return parts

    # -- start -----------------------------------------------------------------

    def start(self, name: str, process: ManagedProcess) -> ManagedProcess:
        process.name = name
        self.processes[name] = process
        self._on_change()
        log.info("starting %s", name)
        process.start(ready_timeout=START_TIMEOUT_S)
        self._on_change()
        return process

    def start_gateway(self) -> ManagedProcess:
        port = free_port()
        argv = [
            sys.executable, "-m", "gateway", "run",
            "--routing", str(self.folder.routing),
            "--host", LOOPBACK, "--port", str(port),
            # Events not yet acknowledged at a stop are resent by the restarted gateway.
            "--event-spill", str(self.folder.root / "gateway-events.spill"),
        ]  # fmt: skip
        # One signing key per run folder: clicks on answers from before a gateway restart
        # still verify (in a cluster the key comes from a Secret).
        env = {GatewayEnv.REQUEST_ID_KEY: self.folder.request_id_key()}
        process = ManagedProcess(
            "gateway", argv, self.folder.logs / "gateway.log", port, env=env,
            probe=HttpProbe("/healthz"),
        )  # fmt: skip
        return self.start("gateway", process)

    def start_feature_job(self, system: RecommenderSystem) -> ManagedProcess:
        port = free_port()
        env = plain_env(feature_job_env(system))
        env.pop("RECSYS_MODEL_ARCHIVE_URI", None)  # every version's vectors come from embeddings/
        env.pop("RECSYS_PULSAR_ADMIN_URL", None)  # pulsar-lite serves no admin API
        env.update(
            RECSYS_METRICS_ADDRESS=f"{LOOPBACK}:{port}",
            RECSYS_EMBEDDINGS_PATH=str(self.folder.embeddings.resolve()),
            RECSYS_EMBEDDINGS_RELOAD="2s",
            RECSYS_RESUBSCRIBE_IDLE=RESUBSCRIBE_IDLE,
            RECSYS_SUBSCRIPTION_TYPE="Shared",  # pulsar-lite handles Shared best
        )
        env.pop("RECSYS_MODEL_VERSION", None)
        argv = [sys.executable, "-m", "recsys_operator.cli", "features", "run"]
        process = ManagedProcess(
            "features", argv, self.folder.logs / "features.log", port, env=env,
            probe=HttpProbe("/metrics"),
        )  # fmt: skip
        return self.start("features", process)

    def start_event_log(self, system: RecommenderSystem) -> ManagedProcess:
        """The event-log sink, writing Parquet into the run folder (docs/event-log.md)."""
        port = free_port()
        env = {
            "RECSYS_LOG_URI": str(self.folder.event_log.resolve()),
            "RECSYS_SYSTEM_ID": system_id(system),
            "RECSYS_PULSAR_SERVICE_URL": system.spec.events.service_url,
            "RECSYS_INTERACTIONS_TOPIC": topic_url(system, TOPIC_NAMES["interactions"]),
            "RECSYS_IMPRESSIONS_TOPIC": topic_url(system, TOPIC_NAMES["impressions"]),
            "RECSYS_SUBSCRIPTION_TYPE": "Shared",
            "RECSYS_RESUBSCRIBE_IDLE": RESUBSCRIBE_IDLE,
            # Simulated users click within seconds; a short window shows the joined
            # impressions within the minutes a local run lasts.
            "RECSYS_CLICK_WINDOW": "1m",
            "RECSYS_METRICS_ADDRESS": f"{LOOPBACK}:{port}",
        }
        argv = [sys.executable, "-m", "recsys_operator.cli", "event-log", "run"]
        process = ManagedProcess(
            "event-log", argv, self.folder.logs / "event-log.log", port, env=env,
            probe=HttpProbe("/metrics"),
        )  # fmt: skip
        return self.start("event-log", process)

    # -- restart ---------------------------------------------------------------

    def restart_failed(self, system: RecommenderSystem, reroute: Callable[[], None]) -> None:
        """Restart every part that exited or hung, within its budget; `reroute` rewrites
        the routing after a model server came back on new ports. A failed part's process
        group is killed first (a hung one would not act on SIGTERM, and what a dead
        leader left behind would hold its port)."""
        for name, process in list(self.processes.items()):
            why = self._why_restart(name, process)
            if why is None:
                continue
            process.kill()
            if not self._budget.allow(name, f"{name} {why}", process.log_path):
                continue
            self.liveness.forget(name)
            try:
                process.start(ready_timeout=START_TIMEOUT_S)
            except ProcessFailed as exc:
                self._record("RestartFailed", str(exc).splitlines()[0], warning=True)
        for version, server in list(self.servers.by_version.items()):
            name = f"torchserve-{version}"
            why = self._why_restart(name, server.process)
            if why is None:
                continue
            # At once: the JVM outlives a dead launcher, and waiting for it to go blocked
            # the supervisor ~20 s.
            server.kill()
            if not self._budget.allow(name, f"{name} {why}", server.process.log_path):
                continue
            self.liveness.forget(name)
            try:
                self.servers.ensure(system, version)
                reroute()
            except Exception as exc:
                self._record("RestartFailed", str(exc).splitlines()[0], warning=True)

    def _why_restart(self, name: str, process: ManagedProcess) -> str | None:
        """Why `name` needs a restart (exited, or hung by its probes), or None."""
        if name in self._budget.given_up:
            return None
        code = process.popen.poll() if process.popen is not None else None
        if code is not None:
            return f"exited with code {code}"
        return self.liveness.hung(name, process)

    # -- stop ------------------------------------------------------------------

    def stop(self) -> None:
        """Everything started, in reverse order of the data: readers before what they read."""
        for name in ["prometheus", "gateway", "event-log", "features"]:
            if name in self.processes:
                self.processes[name].stop()
        self.servers.stop_all()
        stores = [name for name in self.processes if name.startswith("redis")]  # or its nodes
        for name in [*stores, "pulsar"]:
            if name in self.processes:
                self.processes[name].stop()
