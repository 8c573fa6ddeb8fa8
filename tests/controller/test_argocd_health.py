"""The Argo CD health script, run by a real Lua 5.1 interpreter (lupa) on condition fixtures."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from lupa.lua51 import LuaRuntime  # Argo CD runs gopher-lua, a Lua 5.1

from recsys_operator.api.reasons import PERMANENT_REASONS, ConditionReason

SCRIPT = (
    Path(__file__).resolve().parents[2]
    / "charts/recsys-operator/argocd/recommendersystem-health.lua"
).read_text()


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)
    assert lua.eval("_VERSION") == "Lua 5.1"

    def to_lua(value: Any) -> Any:
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    lua.globals().obj = to_lua(obj)
    result = lua.execute(SCRIPT)
    return result["status"], result["message"]


def cond(
    type_: str, status: str, reason: str = "R", message: str = "m", generation: int = 2
) -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def resource(
    conditions: list[dict[str, Any]] | None, generation: int = 2, observed: int = 2, **status: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"name": "x", "generation": generation}}
    if conditions is not None:
        body["status"] = {"observedGeneration": observed, "conditions": conditions, **status}
    return body


CASES = [
    ("no status yet", resource(None), "Progressing", "Waiting for the operator"),
    (
        "ready",
        resource([cond("Ready", "True", "AllComponentsReady", "all good")]),
        "Healthy",
        "all good",
    ),
    (
        "ready but for an older generation",
        resource([cond("Ready", "True")], generation=3, observed=2),
        "Progressing",
        "generation 3",
    ),
    (
        "condition stale although status observed",
        resource([cond("Ready", "True", generation=1)]),
        "Progressing",
        "up-to-date",
    ),
    (
        "pods starting",
        resource([cond("Ready", "False", "DeploymentNotReady", "0/1 ready")]),
        "Progressing",
        "DeploymentNotReady",
    ),
    (
        "invalid spec",
        resource([cond("Ready", "False", "InvalidSpec", "spec.rollout.steps: ...")]),
        "Degraded",
        "InvalidSpec",
    ),
    (
        "missing policy",
        resource([cond("Ready", "False", "ScalingPolicyNotFound", "x")]),
        "Degraded",
        "ScalingPolicyNotFound",
    ),
    (
        "invalid policy",
        resource([cond("Ready", "False", "ScalingPolicyInvalid", "x")]),
        "Degraded",
        "ScalingPolicyInvalid",
    ),
    (
        "partition decrease refused",
        resource([cond("Ready", "False", "TopicPartitionsDecreased", "x")]),
        "Degraded",
        "TopicPartitionsDecreased",
    ),
    (
        "pulsar down: transient",
        resource([cond("Ready", "False", "PulsarAdminFailed", "x")]),
        "Progressing",
        "PulsarAdminFailed",
    ),
    (
        "canary running",
        resource(
            [cond("Ready", "True"), cond("RolloutHealthy", "True", "Progressing")],
            canary={"version": "2", "weight": 25},
        ),
        "Progressing",
        "Canary 2 at 25%",
    ),
    (
        "canary awaiting a person",
        resource(
            [cond("Ready", "True"), cond("RolloutHealthy", "True", "AwaitingPromotion")],
            canary={"version": "2", "weight": 50, "phase": "AwaitingPromotion"},
        ),
        "Suspended",
        "Canary 2 at 50% awaits promotion",
    ),
    (
        "rolled back",
        resource(
            [cond("Ready", "True"), cond("RolloutHealthy", "False", "RolledBack", "CTR fell")]
        ),
        "Degraded",
        "RolledBack: CTR fell",
    ),
    (
        "unknown ready",
        resource([cond("Ready", "Unknown", "Reconciling")]),
        "Progressing",
        "Reconciling",
    ),
]


@pytest.mark.parametrize(("name", "obj", "status", "phrase"), CASES, ids=[c[0] for c in CASES])
def test_health(name: str, obj: dict[str, Any], status: str, phrase: str) -> None:
    got_status, message = health(obj)
    assert got_status == status
    assert phrase in message


def test_the_permanent_reasons_are_those_of_the_reason_enum() -> None:
    """The script's table lists exactly PERMANENT_REASONS, each a reason the operator writes."""
    table = re.search(r"local permanent = \{(.*?)\}", SCRIPT, re.DOTALL)
    assert table is not None
    listed = set(re.findall(r"(\w+) = true", table.group(1)))
    assert listed <= {r.value for r in ConditionReason}, listed - set(ConditionReason)
    assert listed == {r.value for r in PERMANENT_REASONS}


@pytest.mark.parametrize("reason", list(ConditionReason))
def test_a_false_ready_is_degraded_exactly_for_permanent_reasons(reason: ConditionReason) -> None:
    status, message = health(resource([cond("Ready", "False", reason.value, "why")]))
    assert status == ("Degraded" if reason in PERMANENT_REASONS else "Progressing")
    assert message == f"{reason.value}: why"
