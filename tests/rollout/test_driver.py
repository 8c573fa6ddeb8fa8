"""The rollout driver's contract with its two interfaces: what it asks the traffic router
to prepare and route, when, and which analysis it asks the metrics source for.

The router and metrics source here are the project's own interfaces implemented in
memory (what the cluster and local mode implement with status and with processes)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.api.status import (
    AnalysisDecision,
    AnalysisResult,
    CanaryStatus,
    RolloutOutcome,
    RolloutRecord,
)
from recsys_operator.local.desired_state import parse_system
from recsys_operator.render.traffic import TrafficPlan
from recsys_operator.rollout.driver import (
    PrometheusMetrics,
    RolloutDriver,
    version_to_prepare,
)
from recsys_operator.rollout.prometheus_source import PrometheusSource
from recsys_operator.rollout.state_machine import AnalysisSource, RolloutState, Transition

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def system(version: str) -> RecommenderSystem:
    """The quickstart (steps 20, 50, 100 every 2m) asking for `version`."""
    body: dict[str, Any] = copy.deepcopy(
        yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    )
    body["spec"]["model"]["version"] = version
    return parse_system(body)


class Router:
    """Records every call in order; `ready` says whether prepare succeeds."""

    def __init__(self, calls: list[tuple[str, Any]], ready: bool = True) -> None:
        self.calls = calls
        self.ready = ready

    async def prepare(self, system: RecommenderSystem, version: str) -> bool:
        self.calls.append(("prepare", version))
        return self.ready

    async def set_routes(self, system: RecommenderSystem, plan: TrafficPlan) -> None:
        self.calls.append(("set_routes", plan))


class Metrics:
    """Answers every analysis with `decision` and records whom it was asked about."""

    def __init__(self, calls: list[tuple[str, Any]], decision: AnalysisDecision) -> None:
        self.calls = calls
        self.decision = decision

    def analysis_for(self, system: RecommenderSystem, stable_version: str) -> AnalysisSource:
        async def analyse(canary: CanaryStatus, window: float) -> AnalysisResult:
            self.calls.append(("analyse", (stable_version, canary.version, window)))
            return AnalysisResult(
                time="2026-01-01T00:00:00Z", decision=self.decision, reason="scripted"
            )

        return analyse


def driver(
    decision: AnalysisDecision = AnalysisDecision.PASS, ready: bool = True
) -> tuple[RolloutDriver, list[tuple[str, Any]]]:
    calls: list[tuple[str, Any]] = []
    return RolloutDriver(Router(calls, ready), Metrics(calls, decision)), calls


def canary_at(weight: int, step: int, since: datetime) -> CanaryStatus:
    return CanaryStatus(
        version="2",
        weight=weight,
        step=step,
        started_at=since.isoformat(),
        step_started_at=since.isoformat(),
    )


async def test_a_new_version_is_prepared_then_routed_at_the_first_step() -> None:
    rollout, calls = driver()
    recorded: list[Transition] = []

    def record(transition: Transition) -> None:
        calls.append(("record", transition.state.canary.weight if transition.state.canary else 0))
        recorded.append(transition)

    transition = await rollout.step(system("2"), RolloutState("1"), record=record, now=T0)
    assert transition is not None and transition.state.canary is not None
    assert transition.state.canary.weight == 20
    # The server first, then the record, then the traffic: never traffic ahead of either.
    assert calls == [
        ("prepare", "2"),
        ("record", 20),
        ("set_routes", TrafficPlan("1", "2", 20)),
    ]
    assert recorded == [transition]


async def test_a_canary_that_cannot_be_prepared_gets_no_decision_and_no_traffic() -> None:
    rollout, calls = driver(ready=False)
    transition = await rollout.step(system("2"), RolloutState("1"), now=T0)
    assert transition is None
    assert calls == [("prepare", "2")]


async def test_nothing_is_prepared_or_routed_while_stable_serves_the_spec() -> None:
    rollout, calls = driver()
    transition = await rollout.step(system("1"), RolloutState("1"), now=T0)
    assert transition is not None and transition.health.reason == "Stable"
    assert calls == []


async def test_before_the_interval_the_routes_stay_and_no_metrics_are_asked() -> None:
    rollout, calls = driver()
    state = RolloutState("1", canary=canary_at(20, 0, T0))
    transition = await rollout.step(system("2"), state, now=T0 + timedelta(seconds=30))
    assert transition is not None and transition.state == state
    assert calls == [("prepare", "2")]


async def test_a_passing_analysis_of_the_canary_against_stable_moves_the_weight() -> None:
    rollout, calls = driver(AnalysisDecision.PASS)
    state = RolloutState("1", canary=canary_at(20, 0, T0))
    transition = await rollout.step(system("2"), state, now=T0 + timedelta(minutes=3))
    assert transition is not None and transition.state.canary is not None
    assert transition.state.canary.weight == 50
    assert calls == [
        ("prepare", "2"),
        ("analyse", ("1", "2", 120.0)),
        ("set_routes", TrafficPlan("1", "2", 50)),
    ]


async def test_a_failing_analysis_routes_everything_back_to_stable() -> None:
    rollout, calls = driver(AnalysisDecision.FAIL)
    state = RolloutState("1", canary=canary_at(50, 1, T0))
    transition = await rollout.step(system("2"), state, now=T0 + timedelta(minutes=3))
    assert transition is not None and transition.state.canary is None
    assert calls[-1] == ("set_routes", TrafficPlan("1"))


async def test_a_rolled_back_version_is_neither_prepared_nor_retried() -> None:
    rollout, calls = driver()
    last = RolloutRecord(
        version="2", outcome=RolloutOutcome.ROLLED_BACK, time="2026-01-01T12:00:00Z", reason="ctr"
    )
    state = RolloutState("1", last_rollout=last)
    transition = await rollout.step(system("2"), state, now=T0)
    assert transition is not None and transition.health.reason == "RolledBack"
    assert calls == []
    # A newer version moves on.
    assert version_to_prepare("2", state) is None
    assert version_to_prepare("3", state) == "3"


async def test_a_manual_abort_is_applied_and_an_unknown_action_refused() -> None:
    rollout, calls = driver()
    state = RolloutState("1", canary=canary_at(20, 0, T0))
    transition = await rollout.step(
        system("2"), state, action="abort", now=T0 + timedelta(seconds=5)
    )
    assert transition is not None and transition.state.canary is None
    assert transition.state.last_rollout is not None
    assert transition.state.last_rollout.outcome is RolloutOutcome.ABORTED
    assert transition.action is not None and transition.action.result == "Applied"
    assert calls[-1] == ("set_routes", TrafficPlan("1"))

    refused = await rollout.step(system("2"), state, action="rollback", now=T0)
    assert refused is not None and refused.state.canary == state.canary  # went on as before
    assert refused.action is not None and refused.action.result == "Refused"
    assert [e.reason for e in refused.events if e.warning] == ["RolloutActionRefused"]


def test_prometheus_metrics_query_the_system_by_its_id() -> None:
    source = PrometheusMetrics("http://127.0.0.1:1", timeout_s=1).analysis_for(system("2"), "1")
    assert isinstance(source, PrometheusSource)
    # The gateway labels its series with `<namespace>.<name>`; stable is what status says.
    assert (source.system_id, source.stable_version) == ("default.quickstart", "1")


def test_local_mode_acts_on_the_action_file_and_acknowledges_it(tmp_path: Path) -> None:
    """The run folder's rollout-action file is local mode's annotation: read once,
    acted on by the state machine, acknowledged in the events and `lastAction`."""
    from recsys_operator.local.rollout import LocalRollout
    from recsys_operator.local.run_folder import RunFolder

    folder = RunFolder(tmp_path)
    recorded: list[tuple[str, bool]] = []
    calls: list[tuple[str, Any]] = []
    rollout = LocalRollout(
        folder,
        Router(calls),  # type: ignore[arg-type]
        "1",
        lambda reason, message, warning=False: recorded.append((reason, warning)),
    )
    rollout._driver = RolloutDriver(Router(calls), Metrics(calls, AnalysisDecision.PASS))

    folder.action_file.write_text("pause\n")
    rollout.step(system("2"))  # paused before the rollout: version 2 does not start
    assert not folder.action_file.exists()
    assert rollout.state.canary is None and rollout.state.paused
    assert rollout.describe()["lastAction"]["result"] == "Applied"
    assert ("RolloutActionApplied", False) in recorded

    folder.action_file.write_text("rollback")
    rollout.step(system("2"))
    assert rollout.describe()["lastAction"]["action"] == "rollback"
    assert rollout.describe()["lastAction"]["result"] == "Refused"
    assert recorded[-1] == ("RolloutActionRefused", True)
    assert rollout.state.canary is None  # still paused

    folder.action_file.write_text("resume")
    rollout.step(system("2"))
    assert rollout.state.canary is not None and rollout.state.canary.version == "2"
