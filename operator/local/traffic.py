"""Local adapters of the rollout: one TorchServe per served version, and the gateway's
routing file as the traffic router.

In a cluster each track is a Deployment and routing is a ConfigMap; here each version
gets its own TorchServe process (started before its rollout begins, so the canary takes
traffic the moment the state machine gives it a weight) and the routing file is written
by the operator's own renderer, with local URLs in place of Service host names.
"""

from __future__ import annotations

import logging
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
