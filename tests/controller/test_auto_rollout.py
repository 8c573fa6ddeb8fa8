"""spec.training.autoRollout: a candidate that passed the gate is rolled out from status,
and the spec stays as the user wrote it.

Against the Kubernetes API emulator, one step at a time as the operator takes them: the
reconcile records the run's verdict in status.training, the rollout tick (its analysis
passing) starts the canary, the next reconcile renders the canary's Deployment from the
candidate's archive. A finished run is posted as the pod it leaves (see
test_training_status), since the emulator runs no CronJob controller or kubelet.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubemock.fixtures import KubeHandle, PulsarAdminHandle

from recsys_contracts.training_report import GateResult
from recsys_operator.api.status import AnalysisDecision, AnalysisResult, CanaryStatus
from recsys_operator.controller.rollout_driver import rollout_tick

from .test_pruning import World
from .test_training_cronjob import retraining_doc
from .test_training_status import finish_pod, verdict

SYSTEM = "/apis/recsys.dev/v1alpha1/namespaces/default/recommendersystems/quickstart"
CANDIDATE = "20260130-030000"


async def passing(canary: CanaryStatus, window: float) -> AnalysisResult:
    return AnalysisResult(time="2026-01-30T04:00:00Z", decision=AnalysisDecision.PASS, reason="ok")


class TrainedWorld(World):
    def write_status(self, status: dict[str, Any]) -> None:
        self.client.merge_patch(
            "recsys.dev/v1alpha1",
            "RecommenderSystem",
            "default",
            "quickstart",
            {"status": status},
            "status",
        )

    def reconcile_and_record(self) -> dict[str, Any]:
        status: dict[str, Any] = self.reconcile().status
        self.write_status(status)
        return status

    def rollout_tick(self, minute: int = 0) -> dict[str, Any] | None:
        """One tick of the rollout timer, `minute` minutes past 05:00; its status patch is
        written, as the timer does."""
        now = datetime(2026, 1, 30, 5, 0, tzinfo=UTC) + timedelta(minutes=minute)
        patch, _ = asyncio.run(rollout_tick(self.body(), "http://127.0.0.1:1", now, passing))
        if patch is not None:
            self.write_status(patch)
        return patch

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = self.kube.get(SYSTEM)
        return body

    def canary(self) -> dict[str, Any] | None:
        canary: dict[str, Any] | None = (self.body().get("status") or {}).get("canary")
        return canary

    def serving_deployments(self) -> dict[str, dict[str, Any]]:
        objects = self.client.list_objects("apps/v1", "Deployment", "default")
        return {
            obj["metadata"]["name"]: obj
            for obj in objects
            if obj["metadata"]["labels"].get("app.kubernetes.io/component") == "serving"
        }


def trained_world(kube: KubeHandle, pulsar: PulsarAdminHandle, *, auto: bool) -> TrainedWorld:
    world = TrainedWorld(kube, pulsar)
    training = retraining_doc()["spec"]["training"]
    training["autoRollout"] = auto
    world.set_training(training)
    world.reconcile_and_record()  # version 1 serving, no run finished yet
    return world


def finish_run(
    world: TrainedWorld,
    result: GateResult,
    version: str = CANDIDATE,
    pod: str = "quickstart-training-1-abc",
    finished: str = "2026-01-30T03:20:00+00:00",
) -> None:
    score = 0.33 if result is GateResult.PASSED else 0.29
    run = verdict(version, result, finished, score)
    finish_pod(world, pod, run.model_dump_json(by_alias=True))
    world.reconcile_and_record()


def promote(world: TrainedWorld) -> None:
    for tick in range(12):  # steps 20/50/100 two minutes apart, analysis passing
        world.rollout_tick(minute=5 * tick)
        if world.canary() is None:
            return


@pytest.fixture
def auto(kube: KubeHandle, pulsar_admin: PulsarAdminHandle) -> TrainedWorld:
    return trained_world(kube, pulsar_admin, auto=True)


def test_a_passing_candidate_is_rolled_out_from_status_and_the_spec_is_left_alone(
    auto: TrainedWorld,
) -> None:
    finish_run(auto, GateResult.PASSED)
    assert auto.rollout_tick() is not None
    canary = auto.canary()
    assert canary is not None and canary["version"] == CANDIDATE

    auto.reconcile_and_record()
    deployments = auto.serving_deployments()
    (candidate,) = [
        d
        for d in deployments.values()
        if d["metadata"]["labels"].get("recsys.dev/model-version") == CANDIDATE
    ]
    pod = candidate["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert fetch["command"][-2] == f"/source/retrieval/retrieval-{CANDIDATE}.mar"
    assert {"name": "archive-source", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]  # fmt: skip
    # GitOps: the manifest still says what the user wrote.
    assert auto.body()["spec"]["model"]["version"] == "1"


def test_after_promotion_the_candidate_stays_stable_and_the_spec_version_is_not_rolled_back_to(
    auto: TrainedWorld,
) -> None:
    finish_run(auto, GateResult.PASSED)
    promote(auto)
    status = auto.body()["status"]
    assert status["stableVersion"] == CANDIDATE and status.get("canary") is None
    assert status["stableArchiveUri"] == f"pvc://models/retrieval/retrieval-{CANDIDATE}.mar"
    # Later ticks do not start a rollout "back" to the spec's version 1.
    auto.rollout_tick(minute=120)
    assert auto.canary() is None


def test_a_gated_out_candidate_never_touches_serving(auto: TrainedWorld) -> None:
    before = auto.serving_deployments()
    finish_run(auto, GateResult.GATED_OUT)
    auto.rollout_tick()
    assert auto.canary() is None
    auto.reconcile_and_record()
    assert auto.serving_deployments().keys() == before.keys()


def test_without_auto_rollout_a_passing_candidate_waits_for_a_person(
    kube: KubeHandle, pulsar_admin: PulsarAdminHandle
) -> None:
    world = trained_world(kube, pulsar_admin, auto=False)
    finish_run(world, GateResult.PASSED)
    assert world.body()["status"]["training"]["result"] == "Passed"
    world.rollout_tick()
    assert world.canary() is None


def test_a_person_who_changes_spec_model_version_takes_over(auto: TrainedWorld) -> None:
    finish_run(auto, GateResult.PASSED)
    auto.patch(
        "RecommenderSystem",
        "quickstart",
        {
            "spec": {
                "model": {"version": "7", "archiveUri": "pvc://models/retrieval/retrieval-7.mar"}
            }
        },
    )
    auto.reconcile_and_record()
    auto.rollout_tick()
    canary = auto.canary()
    assert canary is not None and canary["version"] == "7"


def test_a_run_gated_out_after_a_promotion_leaves_the_promoted_candidate_serving(
    auto: TrainedWorld,
) -> None:
    finish_run(auto, GateResult.PASSED)
    promote(auto)
    assert auto.body()["status"]["stableVersion"] == CANDIDATE
    for result, pod, finished in (
        (GateResult.GATED_OUT, "quickstart-training-2-def", "2026-01-31T03:20:00+00:00"),
        (GateResult.FAILED, "quickstart-training-3-ghi", "2026-02-01T03:20:00+00:00"),
    ):
        finish_run(auto, result, version=f"later-{pod[-3:]}", pod=pod, finished=finished)
        training = auto.body()["status"]["training"]
        assert training["result"] == result.value
        assert training["rolloutCandidate"]["version"] == CANDIDATE  # still what is served
        auto.rollout_tick(minute=200)
        assert auto.canary() is None  # no rollout "back" to the spec's version 1
        assert auto.body()["status"]["stableVersion"] == CANDIDATE


def test_a_deleted_pod_of_the_newest_run_does_not_bring_back_an_older_candidate(
    auto: TrainedWorld,
) -> None:
    finish_run(auto, GateResult.PASSED)  # the older run, passed
    newer = ("quickstart-training-2-def", "2026-01-31T03:20:00+00:00")
    finish_run(auto, GateResult.GATED_OUT, version="later", pod=newer[0], finished=newer[1])
    auto.patch("RecommenderSystem", "quickstart", {"spec": {"model": {"version": "7", "archiveUri": "pvc://models/retrieval/retrieval-7.mar"}}})  # fmt: skip
    auto.reconcile_and_record()
    auto.client.delete("v1", "Pod", "default", newer[0])  # pod GC
    training = auto.reconcile_and_record()["training"]
    assert (training["job"], training["result"]) == (newer[0], "GatedOut")
    # The older run's candidate is not stamped afresh with the spec's new version.
    assert training["rolloutCandidate"]["specModelVersion"] == "1"
    auto.rollout_tick()
    canary = auto.canary()
    assert canary is not None and canary["version"] == "7"
