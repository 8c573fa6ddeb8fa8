"""Reasons come from one enum, and errors say by their type whose problem they are."""

from __future__ import annotations

import ast
import copy
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from recsys_operator.api.errors import InvalidSpec, PolicyViolation
from recsys_operator.api.reasons import ConditionReason, EventReason
from recsys_operator.api.recommender_system import RolloutSpec
from recsys_operator.api.resources import RecommenderSystem, ScalingPolicy
from recsys_operator.api.status import (
    AnalysisDecision,
    AnalysisResult,
    CanaryStatus,
    RolloutOutcome,
    RolloutRecord,
)
from recsys_operator.render import RenderOptions, render_system
from recsys_operator.rollout import state_machine
from recsys_operator.rollout.state_machine import Action, RolloutState, Transition, tick

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SPEC = RolloutSpec(steps=[10, 50, 100], interval="1m", progress_deadline="30m", max_inconclusive=1)


def load(name: str) -> list[dict]:
    return list(yaml.safe_load_all((ROOT / "examples" / name).read_text()))


# --- the rollout state machine ------------------------------------------------------


def scripted(decision: AnalysisDecision):
    async def source(canary: CanaryStatus, window: float) -> AnalysisResult:
        return AnalysisResult(time="2026-01-01T00:00:00Z", decision=decision, reason="scripted")

    return source


def running(step: int = 0, inconclusive: int = 0, started: datetime = T0) -> RolloutState:
    canary = CanaryStatus(
        version="2",
        weight=SPEC.steps[step],
        step=step,
        started_at=started.isoformat(),
        step_started_at=T0.isoformat(),
        inconclusive_count=inconclusive,
    )
    return RolloutState("1", canary=canary)


LATER = T0 + timedelta(minutes=1, seconds=1)
ROLLED_BACK = RolloutRecord(
    version="2", outcome=RolloutOutcome.ROLLED_BACK, time="2026-01-01T00:00:00Z"
)
# (state, now, decision, spec changes, action, desired version): one per branch of `tick`.
BRANCHES: dict[
    str,
    tuple[RolloutState, datetime, AnalysisDecision | None, dict[str, Any], str | None, str],
] = {
    "stable": (RolloutState("1"), T0, None, {}, None, "1"),
    "not retried": (RolloutState("1", last_rollout=ROLLED_BACK), T0, None, {}, None, "2"),
    "direct": (RolloutState("1"), T0, None, {"steps": [100]}, None, "2"),
    "started": (RolloutState("1"), T0, None, {}, None, "2"),
    "spec moved on": (running(), T0, None, {}, None, "3"),
    "aborted": (running(), T0, None, {}, Action.ABORT, "2"),
    "promoted by a person": (running(), T0, None, {}, Action.PROMOTE, "2"),
    "deadline": (running(started=T0 - timedelta(hours=1)), T0, None, {}, None, "2"),
    "paused": (running(), T0, None, {"paused": True}, None, "2"),
    "waiting": (running(), T0, None, {}, None, "2"),
    "advanced": (running(), LATER, AnalysisDecision.PASS, {}, None, "2"),
    "promoted": (running(step=1), LATER, AnalysisDecision.PASS, {}, None, "2"),
    "failed, held": (
        running(),
        LATER,
        AnalysisDecision.FAIL,
        {"auto_rollback": False},
        None,
        "2",
    ),
    "failed": (running(), LATER, AnalysisDecision.FAIL, {}, None, "2"),
    "inconclusive": (running(), LATER, AnalysisDecision.INCONCLUSIVE, {}, None, "2"),
    "wait": (running(), LATER, AnalysisDecision.WAIT, {}, None, "2"),
    "inconclusive too often": (
        running(inconclusive=1),
        LATER,
        AnalysisDecision.INCONCLUSIVE,
        {},
        None,
        "2",
    ),
}


@pytest.mark.parametrize("branch", list(BRANCHES))
async def test_every_reason_a_rollout_tick_emits_is_in_the_enums(branch: str) -> None:
    state, now, decision, changes, action, version = BRANCHES[branch]
    spec = SPEC.model_copy(update=changes)
    source = scripted(decision or AnalysisDecision.PASS)
    transition: Transition = await tick(version, spec, state, now, source, action)
    assert transition.health.reason in set(ConditionReason), transition.health.reason
    for event in transition.events:
        assert event.reason in set(EventReason), event.reason


def test_every_reason_word_in_the_state_machine_is_in_the_enums() -> None:
    """A new branch of `tick` with a new reason fails here until the enum has it."""
    tree = ast.parse(Path(state_machine.__file__).read_text())
    known: dict[str, set[str]] = {"Health": set(ConditionReason), "Event": set(EventReason)}
    for call in ast.walk(tree):
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
            continue
        if call.func.id not in known:
            continue
        for arg in [*call.args, *(k.value for k in call.keywords)]:
            if (
                isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
                and " " not in arg.value
            ):
                assert arg.value in known[call.func.id], (call.func.id, arg.value)


def test_the_controller_writes_no_reason_as_a_literal() -> None:
    """Conditions, events and blocking in operator/controller name their reason by enum member."""
    calls = {"condition": 2, "blocked": 0, "post_event": 1}
    for path in sorted((ROOT / "operator/controller").glob("*.py")):
        for call in ast.walk(ast.parse(path.read_text())):
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
                continue
            position = calls.get(call.func.id)
            if position is None or len(call.args) <= position:
                continue
            reason = call.args[position]
            assert not isinstance(reason, ast.Constant), f"{path.name}:{call.lineno}"


def test_the_reasons_the_docs_list_are_the_ones_the_operator_writes() -> None:
    """docs/concepts.md's table of conditions names only reasons of the enum, and all of them."""
    text = (ROOT / "docs/concepts.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| `[A-Za-z]+` \|", line)]
    documented: set[str] = set()
    for row in rows:
        _type, true_when, otherwise = row.strip("|").split("|")[:3]
        documented |= set(re.findall(r"`([A-Z][A-Za-z]+)`", true_when + otherwise))
    assert documented <= set(ConditionReason), documented - set(ConditionReason)
    # Valid is the ScalingPolicy's only reason, in the sentence under the table.
    assert set(ConditionReason) - documented == {ConditionReason.VALID}


# --- errors by type -------------------------------------------------------------------

HPA_POLICY = ScalingPolicy.model_validate(load("scaling-policy.yaml")[0])
KEDA_POLICY = ScalingPolicy.model_validate(load("scaling-policy.yaml")[1])


def quickstart(**spec: object) -> RecommenderSystem:
    doc = copy.deepcopy(load("quickstart.yaml")[0])
    doc["spec"].update(spec)
    return RecommenderSystem.model_validate(doc)


def test_a_missing_exceeded_or_unserved_policy_is_a_policy_violation() -> None:
    with pytest.raises(PolicyViolation, match="not found"):
        render_system(quickstart(), None)
    with pytest.raises(PolicyViolation) as info:
        render_system(quickstart(scaling={"maxReplicas": 50}), HPA_POLICY)
    assert info.value.issues[0].path == "spec.scaling.maxReplicas"
    production = RecommenderSystem.model_validate(load("production-gpu.yaml")[0])
    with pytest.raises(PolicyViolation, match="keda"):
        render_system(production, KEDA_POLICY, RenderOptions(keda=False))


def test_an_archive_a_cluster_cannot_fetch_is_a_spec_error_not_a_policy_one() -> None:
    system = quickstart()
    system.spec.model.archive_uri = "file:///tmp/retrieval-1.mar"
    with pytest.raises(InvalidSpec) as info:
        render_system(system, HPA_POLICY)
    assert not isinstance(info.value, PolicyViolation)
    assert info.value.issues[0].path == "spec.model.archiveUri"
