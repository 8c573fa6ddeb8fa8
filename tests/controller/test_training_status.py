"""status.training follows the verdict of the last finished training run, read from its
pod's termination message; the spec is left as the user wrote it.

One reconcile at a time against the Kubernetes API emulator. The emulator runs no
CronJob controller or kubelet, so the test posts the pods a finished run leaves, with
the termination message `recsys retrain --verdict-file /dev/termination-log` writes.
"""

from __future__ import annotations

import pytest
from kubemock.fixtures import KubeHandle, PulsarAdminHandle

from recsys_contracts.training_report import (
    GateResult,
    GateSettings,
    ModelScore,
    TrainingVerdict,
)

from .test_pruning import World
from .test_training_cronjob import retraining_doc

PODS = "/api/v1/namespaces/default/pods"
LABELS = {
    "app.kubernetes.io/name": "recsys",
    "app.kubernetes.io/instance": "quickstart",
    "app.kubernetes.io/component": "training",
}


def verdict(version: str, result: GateResult, finished: str, candidate: float) -> TrainingVerdict:
    return TrainingVerdict(
        model_name="retrieval",
        candidate_version=version,
        stable_version="1",
        started_at=finished,
        finished_at=finished,
        window_start_ms=0,
        window_end_ms=1,
        interactions=50_000,
        gate=GateSettings(
            metric="ndcg@10", min_relative_improvement=0.02, min_users=500, min_interactions=20_000
        ),
        candidate=ModelScore(version=version, value=candidate, users=900),
        stable=ModelScore(version="1", value=0.30, users=900),
        relative_improvement=round(candidate / 0.30 - 1, 6),
        result=result,
        reason=f"ndcg@10 {candidate:.4f} vs stable 1 0.3000",
        archive=f"retrieval-{version}.mar" if result is GateResult.PASSED else None,
    )


def finish_pod(world: World, name: str, message: str, labels: dict[str, str] = LABELS) -> None:
    """A pod of a finished run, as the kubelet leaves it: created, then its status set."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"containers": [{"name": "training", "image": "x"}]},
    }
    world.kube.post(PODS, pod)
    terminated = {"exitCode": 0, "message": message}
    status = {
        "phase": "Succeeded",
        "containerStatuses": [{"name": "training", "state": {"terminated": terminated}}],
    }
    world.client.merge_patch("v1", "Pod", "default", name, {"status": status}, "status")


@pytest.fixture
def world(kube: KubeHandle, pulsar_admin: PulsarAdminHandle) -> World:
    world = World(kube, pulsar_admin)
    world.set_training(retraining_doc()["spec"]["training"])
    return world


def test_the_newest_verdict_reaches_status_and_is_announced_once(world: World) -> None:
    assert "training" not in world.reconcile().status  # no run has finished yet
    passed = verdict("20260130-030000", GateResult.PASSED, "2026-01-30T03:20:00+00:00", 0.33)
    finish_pod(world, "quickstart-training-1-abc", passed.model_dump_json(by_alias=True))
    # Not verdicts: a run killed before it wrote one, and another system's run.
    finish_pod(world, "quickstart-training-2-def", "OOMKilled")
    other = {**LABELS, "app.kubernetes.io/instance": "other"}
    late = verdict("20260131-030000", GateResult.PASSED, "2026-01-31T03:20:00+00:00", 0.5)
    finish_pod(world, "other-training-1-xyz", late.model_dump_json(), other)

    outcome = world.reconcile()
    training = outcome.status["training"]
    assert training == {
        "lastRun": "2026-01-30T03:20:00+00:00",
        "job": "quickstart-training-1-abc",
        "result": "Passed",
        "reason": "ndcg@10 0.3300 vs stable 1 0.3000",
        "candidateVersion": "20260130-030000",
        "stableVersion": "1",
        "metric": "ndcg@10",
        "candidateScore": 0.33,
        "stableScore": 0.3,
        "relativeImprovement": 0.1,
        "archiveUri": "pvc://models/retrieval/retrieval-20260130-030000.mar",
        "rolloutCandidate": {
            "version": "20260130-030000",
            "archiveUri": "pvc://models/retrieval/retrieval-20260130-030000.mar",
            "specModelVersion": "1",
        },
    }
    assert any(
        c.startswith("training run quickstart-training-1-abc: Passed") for c in outcome.changes
    )
    world.client.merge_patch(
        "recsys.dev/v1alpha1",
        "RecommenderSystem",
        "default",
        "quickstart",
        {"status": outcome.status},
        "status",
    )
    again = world.reconcile()
    assert not [c for c in again.changes if c.startswith("training run")]  # announced once

    gated = verdict("20260131-030000", GateResult.GATED_OUT, "2026-01-31T03:20:00+00:00", 0.29)
    finish_pod(world, "quickstart-training-3-ghi", gated.model_dump_json())
    training = world.reconcile().status["training"]
    assert (training["result"], training["candidateVersion"]) == ("GatedOut", "20260131-030000")
    assert "archiveUri" not in training  # nothing published
    # GitOps: the operator never edits the spec; serving still runs version 1.
    body = world.kube.get(
        "/apis/recsys.dev/v1alpha1/namespaces/default/recommendersystems/quickstart"
    )
    assert body["spec"]["model"]["version"] == "1"
