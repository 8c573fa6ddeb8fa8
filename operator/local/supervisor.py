"""The local system's supervisor: starts every part on 127.0.0.1, drives rollouts,
reports in state.json, and stops everything it started.

`recsys up` runs it as a detached process (`python -m recsys_operator.local.supervisor
RUN_DIR`), or in the foreground with `--foreground`. Start order follows the data:
broker and store, the stable model server, then the feature job and the gateway that
depend on them, then Prometheus scraping them. A part that fails to start is reported
with its log tail and everything already started is stopped.

Afterwards, every tick it re-reads the desired state (system.yaml), runs one step of
the operator's rollout state machine (`recsys_operator.rollout.state_machine.tick`,
unchanged) against the local Prometheus, applies the decision through the local
adapters (model servers, routing file), and writes state.json.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.api.status import RolloutOutcome
from recsys_operator.local.desired_state import (
    ManifestError,
    localize,
    parse_system,
    plain_env,
    read_manifest,
)
from recsys_operator.local.process import LOOPBACK, ManagedProcess, ProcessFailed, free_port
from recsys_operator.local.prometheus import prometheus_process, prometheus_url
from recsys_operator.local.pulsar_broker import broker_process, service_url
from recsys_operator.local.redis_server import redis_process, redis_url
from recsys_operator.local.run_folder import (
    RunFolder,
    process_start_time,
    write_json_atomic,
)
from recsys_operator.local.traffic import ModelServers, local_routing, write_routing
from recsys_operator.render.features import feature_job_env
from recsys_operator.render.naming import TOPIC_NAMES, topic_url
from recsys_operator.render.traffic import TrafficPlan
from recsys_operator.rollout.prometheus_source import PrometheusSource
from recsys_operator.rollout.state_machine import Action, RolloutState, Transition, tick

log = logging.getLogger("recsys.local")

TICK_S = 1.0
START_TIMEOUT_S = 60.0
# pulsar-lite may stop feeding one partition to a Shared consumer until it resubscribes.
RESUBSCRIBE_IDLE = "10s"
MAX_EVENTS = 50
ROUTING_SETTLE_S = 2.0
MAX_RESTARTS = 5


class Phase:
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class Options:
    features: bool = True
    """Run the stream feature job (off: static user state, for the value-of-real-time benchmark)."""


@dataclass
class Record:
    """A decision or incident shown by `recsys status` and the dashboard."""

    time: str
    reason: str
    message: str
    warning: bool = False


@dataclass
class LocalSystem:
    folder: RunFolder
    options: Options = field(default_factory=Options)
    phase: str = Phase.STARTING
    error: str | None = None
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    events: deque[Record] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    body: dict[str, Any] = field(default_factory=dict)
    system: RecommenderSystem | None = None
    rollout: RolloutState | None = None
    health: dict[str, Any] = field(default_factory=dict)
    manifest_mtime: float = 0.0
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    _failed_starts: set[str] = field(default_factory=set)
    """Versions whose model server did not start; retried when system.yaml changes."""
    _restarts: dict[str, int] = field(default_factory=dict)
    _given_up: set[str] = field(default_factory=set)
    """Parts past MAX_RESTARTS: reported once, then left stopped."""

    def __post_init__(self) -> None:
        self.servers = ModelServers(self.folder, on_change=self._servers_changed)
        self._lock = threading.Lock()
        self._model_server_targets = self.folder.root / "prometheus" / "model-servers.json"

    def _servers_changed(self) -> None:
        self._write_model_server_targets()
        self.write_state()

    def _write_model_server_targets(self) -> None:
        """Model servers come and go with rollouts; Prometheus follows this file."""
        self._model_server_targets.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._model_server_targets, [{"targets": self.servers.metrics_targets()}])

    # -- start -----------------------------------------------------------------

    def start(self) -> None:
        self.body = read_manifest(self.folder.manifest)
        self.manifest_mtime = self.folder.manifest.stat().st_mtime
        raw = parse_system(self.body)
        topics = raw.spec.events.topics
        partitions = max(topics.interactions.partitions, topics.impressions.partitions)
        self._start("pulsar", broker_process(self.folder.root, default_partitions=partitions))
        self._start("redis", redis_process(self.folder.root))
        system = self.system = localize(
            self.body,
            pulsar_url=service_url(self.processes["pulsar"]),
            redis_url=redis_url(self.processes["redis"]),
        )
        version = system.spec.model.version
        self.rollout = RolloutState(stable_version=version)
        self.servers.ensure(system, version)
        self.write_routing()
        targets = [f"{LOOPBACK}:{self._start_gateway().port}"]
        if self.options.features:
            targets.append(f"{LOOPBACK}:{self._start_feature_job(system).port}")
        self._write_model_server_targets()
        self._start(
            "prometheus",
            prometheus_process(
                self.folder.root,
                targets,
                scrape_interval="2s",
                targets_file=self._model_server_targets,
            ),
        )
        self.phase = Phase.RUNNING
        self.record("Started", f"serving version {version}")

    def _start(self, name: str, process: ManagedProcess) -> ManagedProcess:
        process.name = name
        self.processes[name] = process
        self.write_state()
        log.info("starting %s", name)
        process.start(ready_timeout=START_TIMEOUT_S)
        self.write_state()
        return process

    def _start_gateway(self) -> ManagedProcess:
        port = free_port()
        argv = [
            sys.executable, "-m", "gateway", "run",
            "--routing", str(self.folder.routing),
            "--host", LOOPBACK, "--port", str(port),
        ]  # fmt: skip
        return self._start(
            "gateway", ManagedProcess("gateway", argv, self.folder.logs / "gateway.log", port)
        )

    def _start_feature_job(self, system: RecommenderSystem) -> ManagedProcess:
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
        process = ManagedProcess("features", argv, self.folder.logs / "features.log", port, env=env)
        return self._start("features", process)

    # -- the loop ----------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Tick until `stop` is set."""
        while not stop.wait(TICK_S):
            try:
                self.step()
            except Exception as exc:  # a bad tick is reported; the next one retries
                log.exception("tick failed")
                self.record("TickFailed", str(exc), warning=True)
            self.write_state()

    def step(self) -> None:
        self._check_parts()
        self._reload_manifest()
        assert self.system is not None and self.rollout is not None
        system, state = self.system, self.rollout
        desired = system.spec.model.version
        if self._should_prepare_canary(desired, state):
            try:
                self.servers.ensure(system, desired)
            except Exception as exc:
                self.record("CanaryFailedToStart", str(exc).splitlines()[0], warning=True)
                self._failed_starts.add(desired)
                return
        action = self._take_action()
        source = PrometheusSource(
            prometheus_url(self.processes["prometheus"]),
            self._system_id(),
            state.stable_version,
            system.spec.rollout.analysis,
            timeout_s=3,
        )
        transition = asyncio.run(
            tick(desired, system.spec.rollout, state, datetime.now(UTC), source, action)
        )
        self.apply(transition)

    def _should_prepare_canary(self, desired: str, state: RolloutState) -> bool:
        if desired == state.stable_version or desired in self._failed_starts:
            return False
        if state.canary is not None:
            return state.canary.version == desired and desired not in self.servers.by_version
        last = state.last_rollout
        # The state machine does not retry a version that was rolled back.
        retried = last and last.version == desired and last.outcome is not RolloutOutcome.PROMOTED
        return not retried and desired not in self.servers.by_version

    def apply(self, transition: Transition) -> None:
        self.health = {
            "ok": transition.health.ok,
            "reason": transition.health.reason,
            "message": transition.health.message,
        }
        for event in transition.events:
            self.record(event.reason, event.message, warning=event.warning)
        if transition.state == self.rollout:
            return
        self.rollout = state = transition.state
        canary = state.canary
        served = {state.stable_version} | ({canary.version} if canary else set())
        self.write_routing()
        self.write_state()
        # Only after the gateway has the new routing (it polls every 0.5 s) and its
        # requests in flight are answered may a server go away.
        time.sleep(ROUTING_SETTLE_S)
        self.servers.keep_only(served)

    def write_routing(self) -> None:
        assert self.system is not None and self.rollout is not None
        canary = self.rollout.canary
        plan = TrafficPlan(
            self.rollout.stable_version,
            canary.version if canary else None,
            canary.weight if canary else 0,
        )
        write_routing(self.folder.routing, local_routing(self.system, plan, self.servers))

    def _reload_manifest(self) -> None:
        try:
            mtime = self.folder.manifest.stat().st_mtime
        except OSError:
            return
        if mtime == self.manifest_mtime:
            return
        self.manifest_mtime = mtime
        try:
            body = read_manifest(self.folder.manifest)
            assert self.system is not None
            system = localize(
                body,
                pulsar_url=self.system.spec.events.service_url,
                redis_url=self.system.spec.features.store.url,
            )
        except (ManifestError, OSError, ValueError) as exc:
            self.record(
                "InvalidSpec",
                f"system.yaml ignored, keeping the last good one: {exc}",
                warning=True,
            )
            return
        old = self.system.spec.model.version
        self.body, self.system = body, system
        self._failed_starts.discard(system.spec.model.version)
        if system.spec.model.version != old:
            self.record("SpecChanged", f"model version {old} -> {system.spec.model.version}")

    def _take_action(self) -> str | None:
        try:
            action = self.folder.action_file.read_text().strip()
        except OSError:
            return None
        self.folder.action_file.unlink(missing_ok=True)
        if action not in (Action.ABORT, Action.PROMOTE):
            self.record("UnknownAction", f"ignored rollout action {action!r}", warning=True)
            return None
        self.record("ManualAction", f"{action} requested")
        return action

    def _check_parts(self) -> None:
        """Restart a part that exited, as a kubelet would, on the same port (so every URL
        stays valid), up to MAX_RESTARTS times per part; each exit is an event."""
        for name, process in list(self.processes.items()):
            code = process.popen.poll() if process.popen is not None else None
            if code is None or not self._may_restart(
                name, f"{name} exited with code {code}", process.log_path
            ):
                continue
            try:
                process.start(ready_timeout=START_TIMEOUT_S)
            except ProcessFailed as exc:
                self.record("RestartFailed", str(exc).splitlines()[0], warning=True)
        assert self.system is not None
        for version, server in list(self.servers.by_version.items()):
            name = f"torchserve-{version}"
            if server.process.alive() or not self._may_restart(
                name, f"{name} exited", server.process.log_path
            ):
                continue
            server.stop()  # whatever is left of its process group (JVM, workers)
            try:
                self.servers.ensure(self.system, version)  # new ports: the routing follows
                self.write_routing()
            except Exception as exc:
                self.record("RestartFailed", str(exc).splitlines()[0], warning=True)

    def _may_restart(self, name: str, what: str, log_path: Path) -> bool:
        """Count one more restart of `name` and say so; past MAX_RESTARTS, say once that
        it stays stopped and return False."""
        restarts = self._restarts.get(name, 0)
        if restarts >= MAX_RESTARTS:
            if name not in self._given_up:
                self._given_up.add(name)
                self.record(
                    "PartFailed",
                    f"{what} after {restarts} restarts; left stopped, log {log_path}",
                    warning=True,
                )
            return False
        self._restarts[name] = restarts + 1
        self.record(
            "PartRestarted",
            f"{what}; restarting ({restarts + 1}/{MAX_RESTARTS}), log {log_path}",
            warning=True,
        )
        return True

    # -- stop ---------------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything this supervisor started, in reverse start order."""
        self.phase = Phase.STOPPING
        self.write_state()
        for name in ["prometheus", "gateway", "features"]:
            if name in self.processes:
                self.processes[name].stop()
        self.servers.stop_all()
        for name in ["redis", "pulsar"]:
            if name in self.processes:
                self.processes[name].stop()
        self.phase = Phase.STOPPED if self.error is None else Phase.FAILED
        self.write_state()

    # -- reporting --------------------------------------------------------------------

    def record(self, reason: str, message: str, *, warning: bool = False) -> None:
        (log.warning if warning else log.info)("%s: %s", reason, message)
        self.events.append(Record(datetime.now(UTC).isoformat(), reason, message, warning))

    def _system_id(self) -> str:
        assert self.system is not None
        return f"{self.system.metadata.namespace}.{self.system.metadata.name}"

    def _all_processes(self) -> dict[str, ManagedProcess]:
        parts = dict(self.processes)
        for version, server in self.servers.by_version.items():
            parts[f"torchserve-{version}"] = server.process
        return parts

    def state(self) -> dict[str, Any]:
        parts = {}
        for name, process in self._all_processes().items():
            pid = process.pid
            code = process.popen.poll() if process.popen else None
            parts[name] = {
                "pid": pid,
                "startTime": process_start_time(pid) if pid else None,
                "port": process.port,
                "log": str(process.log_path),
                "status": f"exited ({code})"
                if code is not None
                else ("running" if process.ready else "starting"),
            }
        urls = {}
        if "gateway" in self.processes:
            urls["gateway"] = f"http://{LOOPBACK}:{self.processes['gateway'].port}"
        if "prometheus" in self.processes:
            urls["prometheus"] = prometheus_url(self.processes["prometheus"])
        if "pulsar" in self.processes:
            urls["pulsar"] = service_url(self.processes["pulsar"])
        if "redis" in self.processes:
            urls["redis"] = redis_url(self.processes["redis"])
        for version, server in self.servers.by_version.items():
            urls[f"torchserve-{version}"] = server.predictions_url(version)
        rollout = self.rollout
        return {
            "system": self._system_id() if self.system else None,
            "phase": self.phase,
            "error": self.error,
            "startedAt": self.started_at,
            "supervisor": {"pid": os.getpid(), "startTime": process_start_time(os.getpid())},
            "parts": parts,
            "urls": urls,
            # `recsys events send` targets the running system with these by default.
            "topics": {k: topic_url(self.system, v) for k, v in TOPIC_NAMES.items()}
            if self.system
            else {},
            "desiredVersion": self.system.spec.model.version if self.system else None,
            "rollout": None
            if rollout is None
            else {
                "stableVersion": rollout.stable_version,
                "canary": rollout.canary.to_wire() if rollout.canary else None,
                "lastRollout": rollout.last_rollout.to_wire() if rollout.last_rollout else None,
                "health": self.health,
            },
            "events": [vars(e) for e in self.events],
        }

    def write_state(self) -> None:
        with self._lock:
            self.folder.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.folder.state_file, self.state())


def supervise(folder: RunFolder, options: Options, stop: threading.Event) -> int:
    """Start, run until `stop`, stop. Returns the process exit code."""
    system = LocalSystem(folder, options)
    system.write_state()
    try:
        system.start()
    except Exception as exc:
        system.error = str(exc)
        system.record("StartFailed", str(exc).splitlines()[0], warning=True)
        log.error("start failed: %s", exc)
        system.stop()
        return 1
    system.write_state()
    try:
        system.run(stop)
    finally:
        system.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if not args:
        print(
            "usage: python -m recsys_operator.local.supervisor RUN_DIR [--no-features]",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    options = Options(features="--no-features" not in args)
    return supervise(RunFolder(Path(args[0]).resolve()), options, stop)


if __name__ == "__main__":
    sys.exit(main())
