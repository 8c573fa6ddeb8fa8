"""spec.training.engine RayJob: a KubeRay RayCronJob whose RayJob runs `recsys retrain`.

Validated against KubeRay's own CRD schema (vendored under tests/schemas/kuberay, pruned
to the rendered fields, its pod templates checked as Kubernetes PodTemplates); refused
with its own reason where the cluster does not serve ray.io; and the operator swaps the
CronJob for the RayCronJob (and back) when the engine changes.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shlex
import stat
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubemock.fixtures import KubeHandle, PulsarAdminHandle, minimal_crd

from recsys_operator.api import InvalidResource
from recsys_operator.api.errors import EngineNotServed
from recsys_operator.api.reasons import ConditionReason
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.controller.handlers import _discover_options
from recsys_operator.controller.kube import KubeClient
from recsys_operator.controller.reconcile import Reconciler, parse_system
from recsys_operator.render import RenderOptions, render_system
from recsys_operator.render.naming import Component, selector_labels
from recsys_operator.render.ray_training import submitter_script

from .test_pruning import NS, World
from .test_render import K8S_VERSION
from .test_training_cronjob import arguments as cronjob_arguments
from .test_training_cronjob import retraining_doc

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = yaml.safe_load((ROOT / "tests/schemas/kuberay/raycronjob-v1.yaml").read_text())
RAY = RenderOptions(ray=True)


def ray_doc() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load((ROOT / "examples/retraining-ray.yaml").read_text()))


def raycronjob(doc: dict[str, Any], options: RenderOptions = RAY) -> dict[str, Any]:
    objects = render_system(RecommenderSystem.model_validate(doc), options=options)
    assert not [o for o in objects if o["kind"] == "CronJob"]
    (job,) = [o for o in objects if o["kind"] == "RayCronJob"]
    return job


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it names the fields (kubectl's strict
    field validation); objects without `properties` (maps, the pod templates) stay open."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def pod_templates(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    template = job["spec"]["jobTemplate"]
    cluster = template["rayClusterSpec"]
    found = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        found[group["groupName"]] = group["template"]
    found["submitter"] = template["submitterPodTemplate"]
    return found


def validate(job: dict[str, Any]) -> None:
    jsonschema.validate(job, _strict(SCHEMA))
    for name, template in pod_templates(job).items():
        kubernetes_validate.validate(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": name, "namespace": "default"},
                "template": template,
            },
            K8S_VERSION,
            strict=True,
        )


def entrypoint_arguments(job: dict[str, Any]) -> dict[str, str]:
    words = shlex.split(job["spec"]["jobTemplate"]["entrypoint"])
    assert words[:2] == ["recsys", "retrain"]
    return dict(zip(words[2::2], words[3::2], strict=True))


def test_the_example_renders_a_raycronjob_valid_against_kuberays_schema() -> None:
    job = raycronjob(ray_doc())
    validate(job)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayCronJob")
    assert job["metadata"]["name"] == "retraining-ray-training"
    spec = job["spec"]
    assert (spec["schedule"], spec["suspend"]) == ("0 3 * * *", False)
    template = spec["jobTemplate"]
    assert template["activeDeadlineSeconds"] == 7200 and template["backoffLimit"] == 0
    assert template["shutdownAfterJobFinishes"] is True
    assert template["rayClusterSpec"]["rayVersion"] == "2.52.0"
    assert "workerGroupSpecs" not in template["rayClusterSpec"]  # 0 workers: none rendered
    assert entrypoint_arguments(job) == {
        "--log": "s3://recsys-event-log/default-retraining-ray",
        "--model-store": "/model-store/retrieval",
        "--name": "retrieval",
        "--stable-version": "1",
        "--window": "7d",
        "--metric": "ndcg@10",
        "--min-improvement": "0.02",
        "--min-users": "500",
        "--min-interactions": "20000",
        "--threads": "4",
    }
    head = template["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes["model-store"]["persistentVolumeClaim"] == {"claimName": "models"}
    (container,) = head["containers"]
    assert container["image"] == "registry.example.com/recsys/model-server-ray:2.52.0"
    assert container["resources"]["limits"] == {"memory": "16Gi"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_same_run_as_the_cronjob_and_only_the_submitter_is_labelled_as_training() -> None:
    doc = ray_doc()
    job = raycronjob(doc)
    cron_doc = copy.deepcopy(doc)
    cron_doc["spec"]["training"]["engine"] = "CronJob"
    (cron,) = [
        o
        for o in render_system(RecommenderSystem.model_validate(cron_doc))
        if o["kind"] == "CronJob"
    ]
    expected = cronjob_arguments(cron)
    del expected["--verdict-file"]  # the submitter keeps the verdict instead
    assert entrypoint_arguments(job) == expected
    system = RecommenderSystem.model_validate(doc)
    training_pods = selector_labels(system, Component.TRAINING)
    templates = pod_templates(job)
    assert templates["submitter"]["metadata"]["labels"] == training_pods
    # The Ray pods carry none of the system's labels: the default-deny NetworkPolicy
    # (which selects every pod of the system) must not cut the head off its workers.
    assert "metadata" not in templates["head"]


def test_workers_and_a_pvc_log_are_rendered_valid() -> None:
    doc = ray_doc()
    doc["spec"]["training"]["ray"]["workers"] = {
        "replicas": 3,
        "resources": {"requests": {"cpu": "8", "memory": "32Gi"}, "limits": {"memory": "32Gi"}},
    }
    doc["spec"]["training"]["logUri"] = "pvc://event-log/default/retraining"
    doc["spec"]["training"]["suspend"] = True
    job = raycronjob(doc)
    validate(job)
    assert job["spec"]["suspend"] is True
    (group,) = job["spec"]["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["requests"] == {"cpu": "8", "memory": "32Gi"}
    assert entrypoint_arguments(job)["--log"] == "/event-log/default/retraining"
    head = job["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m for m in head["containers"][0]["volumeMounts"]}
    assert mounts["event-log"]["readOnly"] is True


def test_a_field_kuberay_does_not_know_fails_the_schema() -> None:
    """The strict check can fail: a misspelt field is refused."""
    job = raycronjob(ray_doc())
    job["spec"]["jobTemplate"]["shutdownAfterJobFinish"] = True
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        validate(job)


def test_without_ray_io_the_engine_is_refused_not_replaced() -> None:
    with pytest.raises(EngineNotServed) as info:
        render_system(RecommenderSystem.model_validate(ray_doc()), options=RenderOptions(ray=False))
    (issue,) = info.value.issues
    assert issue.path == "spec.training.engine" and "ray.io" in issue.message


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ray": None}, "spec.training.ray"),
        ({"timeZone": "Europe/Berlin"}, "spec.training.timeZone"),
    ],
)
def test_the_ray_engine_needs_its_ray_block_and_no_time_zone(
    change: dict[str, Any], field: str
) -> None:
    doc = ray_doc()
    doc["spec"]["training"].update(change)
    doc["spec"]["training"] = {k: v for k, v in doc["spec"]["training"].items() if v is not None}
    with pytest.raises(InvalidResource) as info:
        parse_system(doc)
    assert field in {issue.path for issue in info.value.issues}


def _fake_ray(folder: Path, job_output: str, exit_code: int) -> Path:
    """A `ray` on PATH that answers `job list` and, for `job submit`, prints the job's
    output and exits as the job did, as `ray job submit` does."""
    folder.mkdir()
    (folder / "output.txt").write_text(job_output)
    script = folder / "ray"
    script.write_text(
        "#!/bin/sh\n"
        'echo "$@" >> "$(dirname "$0")/calls.txt"\n'
        'if [ "$2" = submit ]; then cat "$(dirname "$0")/output.txt"; '
        f"echo \"Job 'x' done\"; exit {exit_code}; fi\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


@pytest.mark.parametrize("exit_code", [0, 1])
def test_the_submitter_keeps_the_runs_verdict_as_its_termination_message(
    tmp_path: Path, exit_code: int
) -> None:
    verdict = {"format": 1, "modelName": "retrieval", "result": "Passed"}
    output = f"reading the log\ncandidate 2: ndcg@10 0.31\nPassed: better\n{json.dumps(verdict)}\n"
    bin_dir = _fake_ray(tmp_path / "bin", output, exit_code)
    message = tmp_path / "termination-log"
    script = submitter_script(["recsys", "retrain", "--name", "retrieval"], str(message))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RAY_DASHBOARD_ADDRESS": "head:8265",
        "RAY_JOB_SUBMISSION_ID": "run-1",
        "TMPDIR": str(tmp_path),
    }
    done = subprocess.run(
        ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == exit_code
    assert "candidate 2: ndcg@10 0.31" in done.stdout  # the run's output is in the pod's log
    assert json.loads(message.read_text()) == verdict
    calls = (bin_dir / "calls.txt").read_text().splitlines()
    assert calls[0].startswith("job list --address http://head:8265")
    assert calls[1] == (
        "job submit --address http://head:8265 --submission-id run-1 -- "
        "recsys retrain --name retrieval"
    )


def _reconcile(world: World, *, ray: bool) -> Any:
    body = world.kube.get(f"{NS}/recommendersystems/quickstart")
    reconciler = Reconciler(world.client, RenderOptions(monitoring=True, ray=ray))
    return asyncio.run(reconciler.reconcile(body))


def test_changing_the_engine_swaps_the_cronjob_for_the_raycronjob_and_back(
    kube: KubeHandle, pulsar_admin: PulsarAdminHandle
) -> None:
    world = World(kube, pulsar_admin)
    kube.install_crds(minimal_crd("ray.io", "v1", "RayCronJob", "raycronjobs", status=True))
    training = retraining_doc()["spec"]["training"]
    world.set_training(training)
    outcome = _reconcile(world, ray=True)
    assert not outcome.warnings, outcome.warnings
    assert world.names("batch/v1", "CronJob") == ["quickstart-training"]
    assert world.names("ray.io/v1", "RayCronJob") == []

    ray = {"engine": "RayJob", "timeZone": None, "ray": ray_doc()["spec"]["training"]["ray"]}
    world.patch("RecommenderSystem", "quickstart", {"spec": {"training": ray}})
    outcome = _reconcile(world, ray=True)
    assert not outcome.warnings, outcome.warnings
    assert world.names("ray.io/v1", "RayCronJob") == ["quickstart-training"]
    assert world.names("batch/v1", "CronJob") == []
    assert any(c.startswith("CronJob") and "deleted" in c for c in outcome.changes)
    stored = world.client.list_objects("ray.io/v1", "RayCronJob", "default")[0]
    validate({k: stored[k] for k in ("apiVersion", "kind", "spec")})

    world.patch("RecommenderSystem", "quickstart", {"spec": {"training": {"engine": "CronJob"}}})
    outcome = _reconcile(world, ray=True)
    assert not outcome.warnings, outcome.warnings
    assert world.names("batch/v1", "CronJob") == ["quickstart-training"]
    assert world.names("ray.io/v1", "RayCronJob") == []


def test_a_cluster_without_ray_io_reports_the_engine_and_applies_nothing(
    kube: KubeHandle, pulsar_admin: PulsarAdminHandle
) -> None:
    world = World(kube, pulsar_admin)
    training = ray_doc()["spec"]["training"]
    world.set_training(training)
    outcome = _reconcile(world, ray=False)
    ready = next(c for c in outcome.status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == ConditionReason.TRAINING_ENGINE_NOT_SERVED
    assert "spec.training.engine" in ready["message"] and "ray.io" in ready["message"]
    assert world.names("batch/v1", "CronJob") == []  # no silent fallback to the CronJob
    assert world.names("apps/v1", "Deployment") == []


@pytest.mark.parametrize(
    ("crds", "served"),
    [
        ((), False),
        # KubeRay before 1.6 serves ray.io, but has no RayCronJob: not enough.
        ((minimal_crd("ray.io", "v1", "RayJob", "rayjobs"),), False),
        (
            (
                minimal_crd("ray.io", "v1", "RayJob", "rayjobs"),
                minimal_crd("ray.io", "v1", "RayCronJob", "raycronjobs"),
            ),
            True,
        ),
    ],
)
def test_the_operator_discovers_kuberays_raycronjob_at_start_up(
    kube: KubeHandle, crds: tuple[dict[str, Any], ...], served: bool
) -> None:
    if crds:
        kube.install_crds(*crds)
    assert _discover_options(KubeClient(kube.api_client)).ray is served
