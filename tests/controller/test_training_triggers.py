"""spec.training.triggers against a real Prometheus and the Kubernetes API emulator: a
trigger that fires creates a Job from the training CronJob's template (as `kubectl
create job --from=cronjob/...`), one that does not creates nothing, and no second Job
starts while one is active or within the cooldown.

Prometheus holds four hours of the gateway's series, backfilled with `promtool tsdb
create-blocks-from openmetrics` before it starts, one `system` per scenario: the CTR
and served-score histograms the triggers read, with the last hour different from the
hours before it where a scenario needs a change. The triggers are evaluated one at a
time (no Kopf), the status they return written back as the timer writes it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import yaml
from kubemock.fixtures import KubeHandle, PulsarAdminHandle, minimal_crd, wait_for

from recsys_contracts.metric_names import (
    CLICKS,
    IMPRESSIONS,
    SERVED_SCORE_BUCKETS,
    SERVED_TOP_SCORE,
)
from recsys_operator.api.reasons import ConditionReason, EventReason
from recsys_operator.controller import handlers
from recsys_operator.controller.reconcile import Reconciler
from recsys_operator.controller.training_triggers import (
    INSTANTIATE_ANNOTATION,
    TRIGGER_ANNOTATION,
    TriggerOutcome,
    evaluate_triggers,
)
from recsys_operator.launchers.process import free_port
from recsys_operator.launchers.prometheus import prometheus_process, prometheus_url
from recsys_operator.render import RenderOptions
from recsys_operator.retraining.trigger_metrics import PrometheusTriggerMetrics
from recsys_operator.tools import find_tool

from .test_pruning import ROOT, World
from .test_training_cronjob import retraining_doc
from .test_training_rayjob import ray_doc

pytestmark = [pytest.mark.prometheus, pytest.mark.xdist_group("training-triggers")]

SYSTEM = "/apis/recsys.dev/v1alpha1/namespaces/default/recommendersystems/quickstart"
JOBS = "/apis/batch/v1/namespaces/default/jobs"
RAY = "/apis/ray.io/v1/namespaces/default"
STEP_S = 60
SPAN_S = 4 * 3600
RECENT_S = 3600  # the triggers' window in these tests: the last hour
VERSION = {"model_version": "1", "variant": "stable"}

# Per minute, (before the last hour, the last hour).
CTR_SCENARIOS = {  # impressions, clicks
    "t.low-ctr": ((100, 2), (100, 2)),
    "t.high-ctr": ((100, 10), (100, 10)),
    "t.ctr-drop": ((100, 10), (100, 6)),
    "default.quickstart": ((100, 2), (100, 2)),  # the system the operator runs below
}
SCORE_SCENARIOS = {  # top scores per bucket bound
    "t.shifted": ({0.7: 10, 0.75: 10}, {0.4: 10, 0.45: 10}),
    "t.same": ({0.6: 8, 0.7: 12}, {0.6: 8, 0.7: 12}),
}


def _labels(system: str, **extra: str) -> str:
    return ",".join(f'{k}="{v}"' for k, v in {"system": system, **VERSION, **extra}.items())


def _series(name: str, labels: str, before: float, recent: float, now: int) -> list[str]:
    """A counter's samples, one a minute over SPAN_S up to `now`, growing by `before` a
    minute and by `recent` in the last hour."""
    lines, total = [], 0.0
    for t in range(now - SPAN_S, now + 1, STEP_S):
        total += recent if now - t < RECENT_S else before
        lines.append(f"{name}{{{labels}}} {total:g} {t}")
    return lines


def _at_or_below(per_bound: dict[float, int], top: float) -> float:
    return float(sum(count for bound, count in per_bound.items() if bound <= top))


def openmetrics(now: int) -> str:
    impressions = [f"# TYPE {IMPRESSIONS.removesuffix('_total')} counter"]
    clicks = [f"# TYPE {CLICKS.removesuffix('_total')} counter"]
    for system, (before, recent) in CTR_SCENARIOS.items():
        labels = _labels(system, bucket="0")
        impressions += _series(IMPRESSIONS, labels, before[0], recent[0], now)
        clicks += _series(CLICKS, labels, before[1], recent[1], now)
    scores = [f"# TYPE {SERVED_TOP_SCORE} histogram"]
    for system, (before_scores, recent_scores) in SCORE_SCENARIOS.items():
        for le in [f"{b}" for b in SERVED_SCORE_BUCKETS] + ["+Inf"]:
            top = float("inf") if le == "+Inf" else float(le)
            scores += _series(
                f"{SERVED_TOP_SCORE}_bucket",
                _labels(system, le=le),
                _at_or_below(before_scores, top),
                _at_or_below(recent_scores, top),
                now,
            )
        count = (sum(before_scores.values()), sum(recent_scores.values()))
        scores += _series(f"{SERVED_TOP_SCORE}_count", _labels(system), *count, now)
        scores += _series(f"{SERVED_TOP_SCORE}_sum", _labels(system), 0.0, 0.0, now)
    return "\n".join([*impressions, *clicks, *scores, "# EOF"]) + "\n"


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    run = tmp_path_factory.mktemp("triggers")
    now = int(time.time()) - STEP_S
    source = run / "history.om"
    source.write_text(openmetrics(now))
    tsdb = run / "prometheus" / "tsdb"
    subprocess.run(
        [
            find_tool("promtool"),
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            str(source),
            str(tsdb),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    process = prometheus_process(run, targets=[]).start()
    url = prometheus_url(process)

    def loaded() -> bool:
        # Healthy comes before ready: until the blocks are loaded, queries answer 503.
        answer = requests.get(
            f"{url}/api/v1/query", params={"query": f"count({CLICKS})"}, timeout=5
        )
        if answer.status_code != 200:
            return False
        return bool(answer.json()["data"]["result"])

    wait_for(loaded, timeout=60, interval=0.5)
    yield url
    process.stop()


def make_world(
    kube: KubeHandle, pulsar_admin: PulsarAdminHandle, triggers: dict[str, Any]
) -> World:
    world = World(kube, pulsar_admin)
    training = retraining_doc()["spec"]["training"] | {"window": "2h", "triggers": triggers}
    world.set_training(training)
    write_status(world, world.reconcile().status)  # the CronJob, status.stableVersion
    return world


def write_status(world: World, status: dict[str, Any]) -> None:
    world.client.merge_patch(
        "recsys.dev/v1alpha1",
        "RecommenderSystem",
        "default",
        "quickstart",
        {"status": status},
        "status",
    )


def evaluate(world: World, url: str, system: str, now: datetime | None = None) -> TriggerOutcome:
    body = world.kube.get(SYSTEM)
    metrics = PrometheusTriggerMetrics(url, system)
    outcome = asyncio.run(evaluate_triggers(world.client, body, url, metrics=metrics, now=now))
    if outcome.patch is not None:
        write_status(world, outcome.patch)
    return outcome


def jobs(world: World) -> list[dict[str, Any]]:
    return list(world.kube.get(JOBS)["items"])


def trigger_status(world: World) -> dict[str, Any]:
    return dict(world.kube.get(SYSTEM)["status"]["trainingTriggers"])


def trigger_condition(world: World) -> dict[str, Any]:
    conditions = world.kube.get(SYSTEM)["status"]["conditions"]
    return next(c for c in conditions if c["type"] == "TrainingTriggers")


@pytest.mark.parametrize(
    "system,performance,check,value",
    [
        ("t.low-ctr", {"minCtr": 0.05}, "minCtr", 0.02),
        ("t.high-ctr", {"minCtr": 0.05}, None, None),
        ("t.ctr-drop", {"maxCtrDrop": 0.2}, "maxCtrDrop", 0.4),
        ("t.high-ctr", {"maxCtrDrop": 0.2}, None, None),
    ],
)
def test_a_performance_trigger_starts_a_run_only_when_the_stable_ctr_falls(
    kube: KubeHandle,
    pulsar_admin: PulsarAdminHandle,
    prometheus: str,
    system: str,
    performance: dict[str, Any],
    check: str | None,
    value: float | None,
) -> None:
    world = make_world(kube, pulsar_admin, {"performance": performance | {"window": "1h"}})
    outcome = evaluate(world, prometheus, system)
    reading = trigger_status(world)["performance"]
    assert reading["impressions"] == pytest.approx(6000, rel=0.05)
    if check is None:
        assert outcome.job is None and jobs(world) == []
        assert "lastTrigger" not in trigger_status(world)
        assert trigger_condition(world)["reason"] == ConditionReason.TRIGGERS_WATCHING
        return
    (job,) = jobs(world)
    assert outcome.job == job["metadata"]["name"]
    last = trigger_status(world)["lastTrigger"]
    assert (last["trigger"], last["check"], last["job"]) == ("Performance", check, outcome.job)
    assert last["value"] == pytest.approx(value, rel=0.05)
    assert [reason for reason, _, _ in outcome.events] == [EventReason.TRAINING_TRIGGERED]

    # The same Job `kubectl create job --from=cronjob/...` makes.
    cronjob = world.kube.get("/apis/batch/v1/namespaces/default/cronjobs/quickstart-training")
    template = cronjob["spec"]["jobTemplate"]
    assert job["spec"]["template"] == template["spec"]["template"]
    assert job["spec"]["activeDeadlineSeconds"] == template["spec"]["activeDeadlineSeconds"]
    assert job["metadata"]["labels"] == template["metadata"]["labels"]
    assert job["metadata"]["annotations"][INSTANTIATE_ANNOTATION] == "manual"
    assert job["metadata"]["annotations"][TRIGGER_ANNOTATION] == f"Performance/{check}"
    (owner,) = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "CronJob",
        "quickstart-training",
        cronjob["metadata"]["uid"],
        True,
    )


@pytest.mark.parametrize(
    "system,test,threshold,fires",
    [
        ("t.shifted", "PSI", 0.25, True),
        ("t.same", "PSI", 0.25, False),
        ("t.shifted", "KS", 0.5, True),
        ("t.same", "KS", 0.05, False),
    ],
)
def test_a_drift_trigger_starts_a_run_only_on_a_shifted_score_distribution(
    kube: KubeHandle,
    pulsar_admin: PulsarAdminHandle,
    prometheus: str,
    system: str,
    test: str,
    threshold: float,
    fires: bool,
) -> None:
    drift = {"source": "ServedScores", "test": test, "threshold": threshold, "window": "1h"}
    world = make_world(kube, pulsar_admin, {"drift": drift})
    outcome = evaluate(world, prometheus, system)
    reading = trigger_status(world)["drift"]
    assert reading["recentCount"] == pytest.approx(1200, rel=0.05)
    assert reading["referenceCount"] == pytest.approx(2400, rel=0.05)
    if not fires:
        assert reading["value"] == pytest.approx(0.0, abs=1e-6)
        assert outcome.job is None and jobs(world) == []
        return
    # Every recent score lies below every reference one: KS is 1 and PSI far beyond
    # 0.25 (17 with no overlap; the minute the evaluation runs after the data ends moves
    # a minute of the last hour's scores into the reference window, so a little less).
    if test == "KS":
        assert reading["value"] == pytest.approx(1.0, abs=0.03)
    else:
        assert 10 < reading["value"] <= 17.031
    (job,) = jobs(world)
    last = trigger_status(world)["lastTrigger"]
    assert (last["trigger"], last["check"], last["job"]) == ("Drift", test, job["metadata"]["name"])
    assert outcome.drift is not None and outcome.drift.value == reading["value"]


def test_no_second_run_while_one_is_active_or_within_the_cooldown(
    kube: KubeHandle, pulsar_admin: PulsarAdminHandle, prometheus: str
) -> None:
    world = make_world(kube, pulsar_admin, {"performance": {"minCtr": 0.05, "window": "1h"}})
    first = evaluate(world, prometheus, "t.low-ctr").job
    assert first is not None

    assert evaluate(world, prometheus, "t.low-ctr").job is None  # the Job has not finished
    assert len(jobs(world)) == 1
    assert "is still active" in trigger_status(world)["waiting"]

    finished = {
        "completionTime": datetime.now(UTC).isoformat(),
        "conditions": [{"type": "Complete", "status": "True"}],
    }
    world.client.merge_patch("batch/v1", "Job", "default", first, {"status": finished}, "status")
    assert evaluate(world, prometheus, "t.low-ctr").job is None  # cooldown: one window
    assert len(jobs(world)) == 1
    assert "cooldown" in trigger_status(world)["waiting"]

    later = datetime.now(UTC) + timedelta(minutes=61)
    second = evaluate(world, prometheus, "t.low-ctr", now=later).job
    assert second is not None and second != first
    assert len(jobs(world)) == 2
    assert "waiting" not in trigger_status(world)
    assert trigger_status(world)["lastTrigger"]["job"] == second


def test_a_triggered_job_is_the_one_kubectl_create_job_from_cronjob_makes(
    kube: KubeHandle, pulsar_admin: PulsarAdminHandle, prometheus: str
) -> None:
    world = make_world(kube, pulsar_admin, {"performance": {"minCtr": 0.05, "window": "1h"}})
    ours = evaluate(world, prometheus, "t.low-ctr").job
    # The Job kubectl builds (it would send it as protobuf, which the emulator does not read).
    made = kube.kubectl(
        "create",
        "job",
        "by-hand",
        "--from=cronjob/quickstart-training",
        "--dry-run=client",
        "-o",
        "json",
    )
    theirs = json.loads(made.stdout)
    (mine,) = [job for job in jobs(world) if job["metadata"]["name"] == ours]
    assert mine["spec"] == theirs["spec"]
    for part in ("labels", "ownerReferences"):
        assert mine["metadata"][part] == theirs["metadata"][part], part
    annotations = dict(mine["metadata"]["annotations"])
    assert annotations.pop(TRIGGER_ANNOTATION) == "Performance/minCtr"  # ours adds only this
    assert annotations == theirs["metadata"]["annotations"]


def test_a_create_whose_answer_is_lost_starts_no_second_run(
    kube: KubeHandle, pulsar_admin: PulsarAdminHandle, prometheus: str
) -> None:
    # The emulator stores the Job, then answers 500 (a reply lost on the way back).
    world = make_world(kube, pulsar_admin, {"performance": {"minCtr": 0.05, "window": "1h"}})
    kube.emulator.fail_next(1, method="POST", path=JOBS, status=500)
    assert evaluate(world, prometheus, "t.low-ctr").job is None  # no crash of the timer
    assert "failed: 500" in trigger_status(world)["waiting"]
    assert evaluate(world, prometheus, "t.low-ctr").job is None  # the next tick sees it
    assert len(jobs(world)) == 1
    assert "is still active" in trigger_status(world)["waiting"]


def test_removing_the_triggers_removes_their_status(
    kube: KubeHandle, pulsar_admin: PulsarAdminHandle, prometheus: str
) -> None:
    world = make_world(kube, pulsar_admin, {"performance": {"minCtr": 0.05, "window": "1h"}})
    evaluate(world, prometheus, "t.high-ctr")
    assert trigger_condition(world)["status"] == "True"
    world.patch("RecommenderSystem", "quickstart", {"spec": {"training": {"triggers": None}}})
    evaluate(world, prometheus, "t.high-ctr")
    status = world.kube.get(SYSTEM)["status"]
    assert "trainingTriggers" not in status
    assert "TrainingTriggers" not in [c["type"] for c in status["conditions"]]
    assert "Ready" in [c["type"] for c in status["conditions"]]  # the others stay


def test_user_feature_drift_is_reported_as_not_supported_and_starts_nothing(
    kube: KubeHandle, pulsar_admin: PulsarAdminHandle, prometheus: str
) -> None:
    world = make_world(kube, pulsar_admin, {"drift": {"source": "UserFeatures", "window": "1h"}})
    outcome = evaluate(world, prometheus, "t.shifted")
    cond = trigger_condition(world)
    assert (cond["status"], cond["reason"]) == ("False", ConditionReason.DRIFT_SOURCE_NOT_SUPPORTED)
    assert "not supported yet" in cond["message"]
    assert [(r, w) for r, _, w in outcome.events] == [
        (EventReason.TRAINING_TRIGGER_NOT_SUPPORTED, True)
    ]
    assert jobs(world) == []
    assert evaluate(world, prometheus, "t.shifted").events == []  # warned once


def test_no_answer_from_prometheus_decides_nothing(
    kube: KubeHandle, pulsar_admin: PulsarAdminHandle
) -> None:
    world = make_world(kube, pulsar_admin, {"performance": {"minCtr": 0.5, "window": "1h"}})
    outcome = evaluate(world, f"http://127.0.0.1:{free_port()}", "t.low-ctr")
    assert outcome.job is None and jobs(world) == []
    cond = trigger_condition(world)
    assert (cond["status"], cond["reason"]) == ("Unknown", ConditionReason.TRIGGER_METRICS_MISSING)


def test_the_operator_starts_a_run_and_announces_it(
    kube: KubeHandle,
    pulsar_admin: PulsarAdminHandle,
    prometheus: str,
    run_operator: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kopf, the reconcile and the trigger timer (every second in these tests) together."""
    monkeypatch.setenv("RECSYS_PROMETHEUS_URL", prometheus)  # read at the operator's start
    doc = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text()))
    doc["spec"]["events"]["adminUrl"] = pulsar_admin.url
    doc["spec"]["model"]["archiveUri"] = "pvc://models/retrieval/retrieval-1.mar"
    doc["spec"]["training"] = retraining_doc()["spec"]["training"] | {
        "triggers": {"performance": {"minCtr": 0.05, "window": "1h"}}
    }
    doc["spec"].pop("scalingPolicyRef", None)
    kube.post("/apis/recsys.dev/v1alpha1/namespaces/default/recommendersystems", doc)
    handlers.STATE.analysis_source = None
    run_operator("recsys_operator.controller.handlers")

    (job,) = wait_for(lambda: kube.get(JOBS)["items"], timeout=30)
    assert job["metadata"]["annotations"][TRIGGER_ANNOTATION] == "Performance/minCtr"

    def announced() -> list[dict[str, Any]]:
        items = kube.get("/api/v1/namespaces/default/events")["items"]
        return [e for e in items if e["reason"] == EventReason.TRAINING_TRIGGERED]

    (event,) = wait_for(announced, timeout=30)
    assert job["metadata"]["name"] in event["message"] and "below minCtr 0.05" in event["message"]
    last = wait_for(
        lambda: kube.get(SYSTEM)["status"].get("trainingTriggers", {}).get("lastTrigger")
    )
    assert last["job"] == job["metadata"]["name"]
    time.sleep(3)  # three more ticks: the run is active, so no second Job
    assert len(kube.get(JOBS)["items"]) == 1


def test_with_the_ray_engine_a_trigger_starts_a_rayjob_from_the_raycronjob(
    kube: KubeHandle, pulsar_admin: PulsarAdminHandle, prometheus: str
) -> None:
    world = World(kube, pulsar_admin)
    kube.install_crds(
        minimal_crd("ray.io", "v1", "RayCronJob", "raycronjobs"),
        minimal_crd("ray.io", "v1", "RayJob", "rayjobs"),
    )
    training = ray_doc()["spec"]["training"] | {
        "window": "2h",
        "triggers": {"performance": {"minCtr": 0.05, "window": "1h"}},
    }
    world.set_training(training)
    body = world.kube.get(SYSTEM)
    reconciler = Reconciler(world.client, RenderOptions(monitoring=True, ray=True))
    write_status(world, asyncio.run(reconciler.reconcile(body)).status)

    raycronjob = world.kube.get(f"{RAY}/raycronjobs/quickstart-training")
    # A run the schedule started, as KubeRay creates it: owned, none of the system's labels.
    scheduled = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": "quickstart-training-29000000",
            "namespace": "default",
            "ownerReferences": [
                {
                    "apiVersion": "ray.io/v1",
                    "kind": "RayCronJob",
                    "name": "quickstart-training",
                    "uid": raycronjob["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": raycronjob["spec"]["jobTemplate"],
    }
    world.kube.post(f"{RAY}/rayjobs", scheduled)
    assert evaluate(world, prometheus, "t.low-ctr").job is None
    assert "is still active" in trigger_status(world)["waiting"]
    done = {"jobDeploymentStatus": "Complete", "endTime": datetime.now(UTC).isoformat()}
    name = scheduled["metadata"]["name"]
    world.client.merge_patch("ray.io/v1", "RayJob", "default", name, {"status": done}, "status")

    soon = datetime.now(UTC) + timedelta(minutes=61)  # past the cooldown after that run
    first = evaluate(world, prometheus, "t.low-ctr", now=soon).job
    assert first is not None and jobs(world) == []  # no batch Job with this engine
    run = world.kube.get(f"{RAY}/rayjobs/{first}")
    assert run["spec"] == raycronjob["spec"]["jobTemplate"]  # the run a tick would start
    assert run["metadata"]["annotations"][TRIGGER_ANNOTATION] == "Performance/minCtr"
    (owner,) = run["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("RayCronJob", raycronjob["metadata"]["uid"])

    assert evaluate(world, prometheus, "t.low-ctr", now=soon).job is None  # the RayJob runs
    assert "is still active" in trigger_status(world)["waiting"]
    world.client.merge_patch("ray.io/v1", "RayJob", "default", first, {"status": done}, "status")
    later = soon + timedelta(minutes=61)
    second = evaluate(world, prometheus, "t.low-ctr", now=later).job
    assert second is not None and second != first
