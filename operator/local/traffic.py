"""Local mode's traffic router (`rollout.driver.TrafficRouter`): one TorchServe per
served version, and the gateway's routing file.

In a cluster each track is a Deployment and routing is a ConfigMap; here each version
gets its own TorchServe process (started before its rollout begins, so the canary takes
traffic the moment the state machine gives it a weight) and the routing file is written
by the operator's own renderer, with local URLs in place of Service host names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.launchers.torchserve import LocalTorchServe, torchserve_server
from recsys_operator.local.desired_state import plain_env
from recsys_operator.local.run_folder import RunFolder, write_json_atomic
from recsys_operator.render.gateway import gateway_routing
from recsys_operator.render.serving import model_server_env
from recsys_operator.render.traffic import TrafficPlan

log = logging.getLogger(__name__)

TORCHSERVE_START_TIMEOUT_S = 240.0


class ModelServers:
    """The TorchServe processes of a local system, one per served model version."""

    def __init__(self, folder: RunFolder, on_change: Callable[[], None] = lambda: None) -> None:
        self.folder = folder
        self.by_version: dict[str, LocalTorchServe] = {}
        self._on_change = on_change

    def ensure(self, system: RecommenderSystem, version: str) -> LocalTorchServe:
        """The server of `version`, started (and ready) if it was not running."""
        server = self.by_version.get(version)
        if server is not None and server.process.alive():
            return server
        model = system.spec.model.model_copy(update={"version": version})
        env = plain_env(model_server_env(system, version))
        server = torchserve_server(
            self.folder.root / "torchserve" / version,
            model=model,
            serving=system.spec.serving,
            model_store=self.folder.model_store,
            versions=[version],
            env=env,
        )
        # The log is per version, so a failed canary's log survives the next start.
        server.process.log_path = self.folder.logs / f"torchserve-{version}.log"
        self.by_version[version] = server
        self._on_change()
        log.info("starting TorchServe for version %s", version)
        server.start(timeout=TORCHSERVE_START_TIMEOUT_S)
        self._on_change()
        return server

    def keep_only(self, versions: set[str]) -> None:
        for version in [v for v in self.by_version if v not in versions]:
            log.info("stopping TorchServe for version %s (no longer served)", version)
            self.by_version.pop(version).stop()
            self._on_change()

    def stop_all(self) -> None:
        self.keep_only(set())

    def metrics_targets(self) -> list[str]:
        return [f"127.0.0.1:{s.ports.metrics}" for s in self.by_version.values()]


def local_routing(
    system: RecommenderSystem, plan: TrafficPlan, servers: ModelServers
) -> dict[str, Any]:
    """The operator's routing for `plan`, pointing at the local servers."""
    routing = gateway_routing(system, plan)
    for track in ("stable", "canary"):
        endpoint = routing.get(track)
        if endpoint:
            endpoint["url"] = servers.by_version[endpoint["version"]].predictions_url(
                endpoint["version"]
            )
    return routing


def write_routing(path: Path, routing: dict[str, Any]) -> None:
    write_json_atomic(path, routing)  # the gateway must never read half a file


ROUTING_SETTLE_S = 2.0
"""How long an unused server lives on after the routing changed: the gateway polls the
file every 0.5 s, and its requests in flight must be answered."""

Say = Callable[..., None]
"""Records an event: (reason, message, warning=...)."""


class LocalRouter:
    """Moves traffic between the local model servers by rewriting routing.json."""

    def __init__(
        self,
        path: Path,
        servers: ModelServers,
        record: Say,
        on_routed: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = path
        self.servers = servers
        self._record = record
        self._on_routed = on_routed
        self._failed_starts: set[str] = set()
        """Versions whose server did not start; tried again once the spec changes."""

    async def prepare(self, system: RecommenderSystem, version: str) -> bool:
        """Start `version`'s TorchServe (blocking: the tick waits for it). A version that
        failed to start is not tried again until `retry`; the tick then goes on."""
        if version in self._failed_starts or version in self.servers.by_version:
            return True
        try:
            self.servers.ensure(system, version)
        except Exception as exc:
            self._record("CanaryFailedToStart", str(exc).splitlines()[0], warning=True)
            self._failed_starts.add(version)
            return False
        return True

    def retry(self, version: str) -> None:
        self._failed_starts.discard(version)

    async def set_routes(self, system: RecommenderSystem, plan: TrafficPlan) -> None:
        self.write(system, plan)
        self._on_routed()
        # Only after the gateway has the new routing and answered what it had in flight
        # may a server go away.
        time.sleep(ROUTING_SETTLE_S)
        self.servers.keep_only(set(plan.versions))

    def write(self, system: RecommenderSystem, plan: TrafficPlan) -> None:
        write_routing(self.path, local_routing(system, plan, self.servers))
