"""The operator's rollout tick on a resource body: what it writes, and when it waits."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from recsys_operator.api.status import AnalysisDecision, AnalysisResult, CanaryStatus
from recsys_operator.controller.rollout_driver import rollout_tick

ROOT = Path(__file__).resolve().parents[2]


async def passing(canary: CanaryStatus, window: float) -> AnalysisResult:
    return AnalysisResult(time="2026-01-01T00:00:00Z", decision=AnalysisDecision.PASS, reason="ok")


def mid_rollout(serving_ready: dict[str, Any]) -> dict[str, Any]:
    """Version 2 at its first step (20%) with the interval long passed."""
    doc = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text()))
    doc["spec"]["model"]["version"] = "2"
    doc["status"] = {
        "stableVersion": "1",
        "canary": {
            "version": "2",
            "weight": 20,
            "step": 0,
            "stepStartedAt": "2026-01-01T00:00:00Z",
            "startedAt": "2026-01-01T00:00:00Z",
        },
        "conditions": [
            {
                "type": "ServingReady",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
                "message": "",
                **serving_ready,
            }
        ],
    }
    return doc


def tick(body: dict[str, Any]) -> tuple[dict[str, Any] | None, Any]:
    now = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)
    return asyncio.run(rollout_tick(body, "http://127.0.0.1:1", now=now, source=passing))


def test_a_passing_analysis_advances_the_weight() -> None:
    patch, transition = tick(mid_rollout({"status": "True", "reason": "DeploymentAvailable"}))
    assert transition is not None and patch is not None
    assert patch["canary"]["weight"] == 50


def test_a_system_whose_children_cannot_be_applied_holds_its_rollout() -> None:
    # The reconcile refuses the spec (policy exceeded), so the routing ConfigMap stays
    # where it is; moving the rollout on would make status lie about the traffic.
    for reason in ("PolicyViolation", "InvalidSpec", "ScalingPolicyNotFound"):
        patch, transition = tick(mid_rollout({"status": "False", "reason": reason}))
        assert (patch, transition) == (None, None), reason
