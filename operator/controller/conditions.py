"""Kubernetes-style status conditions: computed fresh each reconcile, merged so that
`lastTransitionTime` only moves when a condition's status actually changes."""

from __future__ import annotations

from typing import Any

from recsys_operator.api.reasons import ConditionReason
from recsys_operator.api.status import Condition, ConditionStatus, ConditionType


def condition(
    type_: ConditionType, ok: bool | None, reason: str, message: str, generation: int
) -> Condition:
    status = (
        ConditionStatus.UNKNOWN
        if ok is None
        else (ConditionStatus.TRUE if ok else ConditionStatus.FALSE)
    )
    return Condition(
        type=type_.value,
        status=status,
        reason=reason,
        message=message,
        observed_generation=generation,
    )


def merge_conditions(old: list[dict[str, Any]], new: list[Condition]) -> list[dict[str, Any]]:
    """`new` conditions in wire form, keeping each old lastTransitionTime whose status is unchanged.

    Conditions of other types present in `old` (e.g. RolloutHealthy, owned by the
    rollout controller) are kept as they are.
    """
    by_type = {c.get("type"): c for c in old}
    merged = []
    for cond in new:
        wire = cond.to_wire()
        previous = by_type.pop(cond.type, None)
        if (
            previous
            and previous.get("status") == wire["status"]
            and previous.get("lastTransitionTime")
        ):
            wire["lastTransitionTime"] = previous["lastTransitionTime"]
        merged.append(wire)
    merged.extend(by_type.values())
    order = [t.value for t in ConditionType]
    return sorted(
        merged, key=lambda c: order.index(c["type"]) if c["type"] in order else len(order)
    )


def summarize_ready(parts: list[Condition], generation: int) -> Condition:
    """Ready is True when every part is True; otherwise it carries the first failing part's reason."""
    failing = [c for c in parts if c.status != ConditionStatus.TRUE]
    if not failing:
        return condition(
            ConditionType.READY,
            True,
            ConditionReason.ALL_COMPONENTS_READY,
            "topics, features and serving are ready",
            generation,
        )
    first = failing[0]
    message = "; ".join(f"{c.type}: {c.message}" for c in failing)
    ok = None if all(c.status == ConditionStatus.UNKNOWN for c in failing) else False
    return condition(ConditionType.READY, ok, first.reason, message, generation)
