"""Local mode's rollout: the operator's driver (`rollout.driver`) with the local
traffic router (`traffic.LocalRouter`) and the local Prometheus, its state kept in
memory and reported in state.json.

A person's abort, promote, pause or resume arrives as the run folder's rollout-action
file (what the annotation is in a cluster); the tick that reads it acts on it and
acknowledges it (an event and `lastAction` in state.json), an unknown value is refused.
"""

from __future__ import annotations

import asyncio
from typing import Any

from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.local.run_folder import RunFolder
from recsys_operator.local.traffic import LocalRouter, Say
from recsys_operator.render.naming import system_id
from recsys_operator.render.traffic import TrafficPlan
from recsys_operator.rollout.driver import (
    PrometheusMetrics,
    RolloutDriver,
    traffic_plan,
)
from recsys_operator.rollout.shadow_analysis import PrometheusShadowSource
from recsys_operator.rollout.state_machine import Gates, RolloutState, Transition
from recsys_operator.rollout.webhooks import HttpWebhooks

PROMETHEUS_TIMEOUT_S = 3
"""Per query: a tick (one a second) must not wait long for a Prometheus that is down."""


class LocalRollout:
    def __init__(
        self, folder: RunFolder, router: LocalRouter, stable_version: str, record: Say
    ) -> None:
        self.folder = folder
        self.router = router
        self.state = RolloutState(stable_version=stable_version)
        self.health: dict[str, Any] = {}
        self.last_action: dict[str, Any] | None = None
        self._record = record
        self._driver: RolloutDriver | None = None

    def use_prometheus(self, url: str) -> None:
        def gates(system: RecommenderSystem) -> Gates:
            # Webhooks are called as in a cluster; nobody counts replicas here (one model
            # server per version), so there is no scale-up before promotion.
            shadow = system.spec.rollout.shadow
            return Gates(
                HttpWebhooks(system.metadata.name, system.metadata.namespace or "default"),
                shadow=PrometheusShadowSource(
                    url, system_id(system), shadow, timeout_s=PROMETHEUS_TIMEOUT_S
                )
                if shadow is not None
                else None,
            )

        self._driver = RolloutDriver(
            self.router, PrometheusMetrics(url, PROMETHEUS_TIMEOUT_S), gates=gates
        )

    def plan(self, system: RecommenderSystem) -> TrafficPlan:
        return traffic_plan(system, self.state)

    def step(self, system: RecommenderSystem) -> None:
        asyncio.run(self._step(system))

    async def _step(self, system: RecommenderSystem) -> None:
        assert self._driver is not None, "use_prometheus() first"
        if not await self._driver.prepare(system, self.state):
            return  # the canary's server did not start (reported); the next tick goes on
        action = self._take_action()
        await self._driver.decide(system, self.state, record=self._apply, action=action)

    def _apply(self, transition: Transition) -> None:
        self.health = {
            "ok": transition.health.ok,
            "reason": transition.health.reason,
            "message": transition.health.message,
        }
        for event in transition.events:
            self._record(event.reason, event.message, warning=event.warning)
        if transition.action is not None:
            self.last_action = transition.action.to_wire()
        self.state = transition.state

    def _take_action(self) -> str | None:
        try:
            requested = self.folder.action_file.read_text().strip()
        except OSError:
            return None
        self.folder.action_file.unlink(missing_ok=True)
        return requested  # the state machine validates and acknowledges it

    def describe(self) -> dict[str, Any]:
        state = self.state
        return {
            "stableVersion": state.stable_version,
            "canary": state.canary.to_wire() if state.canary else None,
            "lastRollout": state.last_rollout.to_wire() if state.last_rollout else None,
            "health": self.health,
            "lastAction": self.last_action,
        }
