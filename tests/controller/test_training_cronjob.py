"""spec.training renders a CronJob that runs `recsys retrain` from the event log: valid
Kubernetes, the spec's schedule, window and gate, the stable version of the moment,
the model store mounted read-write; and it is deleted when spec.training goes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubemock.fixtures import KubeHandle, PulsarAdminHandle

from recsys_operator.api import InvalidResource
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.render import render_system

from .test_pruning import World
from .test_render import K8S_VERSION

ROOT = Path(__file__).resolve().parents[2]


def retraining_doc() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load((ROOT / "examples" / "retraining.yaml").read_text()))


def cronjob(doc: dict[str, Any]) -> dict[str, Any]:
    objects = render_system(RecommenderSystem.model_validate(doc))
    (job,) = [o for o in objects if o["kind"] == "CronJob"]
    return job


def arguments(job: dict[str, Any]) -> dict[str, str]:
    args = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "retrain"
    return dict(zip(args[1::2], args[2::2], strict=True))


def test_the_example_renders_a_strictly_valid_cronjob_with_the_spec_settings() -> None:
    job = cronjob(retraining_doc())
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    spec = job["spec"]
    assert (spec["schedule"], spec["timeZone"]) == ("0 3 * * *", "Europe/Berlin")
    assert spec["concurrencyPolicy"] == "Forbid" and spec["suspend"] is False
    assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 7200
    assert arguments(job) == {
        "--log": "s3://recsys-event-log/default-retraining",
        "--model-store": "/model-store/retrieval",
        "--name": "retrieval",
        "--stable-version": "1",
        "--window": "7d",
        "--metric": "ndcg@10",
        "--min-improvement": "0.02",
        "--min-users": "500",
        "--min-interactions": "20000",
        "--threads": "2",
        "--verdict-file": "/dev/termination-log",
    }
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-store"]["persistentVolumeClaim"] == {"claimName": "models"}
    (container,) = pod["containers"]
    # The image holding torch, FAISS and the archiver; its default command is TorchServe.
    assert "/model-server:" in container["image"] and container["command"] == ["recsys"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/model-store", "/tmp"}
    assert container["resources"]["limits"] == {"memory": "8Gi"}


def test_a_pvc_log_is_mounted_read_only() -> None:
    doc = retraining_doc()
    doc["spec"]["training"]["logUri"] = "pvc://event-log/default/retraining"
    job = cronjob(doc)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert arguments(job)["--log"] == "/event-log/default/retraining"
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["event-log"]["persistentVolumeClaim"] == {
        "claimName": "event-log",
        "readOnly": True,
    }
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["event-log"]["readOnly"] is True


def test_during_a_rollout_the_run_compares_with_the_version_serving_as_stable() -> None:
    doc = retraining_doc()
    doc["spec"]["model"]["version"] = "2"
    doc["spec"]["model"]["archiveUri"] = "pvc://models/retrieval/retrieval-2.mar"
    doc["status"] = {
        "stableVersion": "1",
        "stableArchiveUri": "pvc://models/retrieval/retrieval-1.mar",
        "canary": {"version": "2", "weight": 25, "step": 1},
    }
    assert arguments(cronjob(doc))["--stable-version"] == "1"


def test_no_training_no_cronjob() -> None:
    doc = retraining_doc()
    del doc["spec"]["training"]
    objects = render_system(RecommenderSystem.model_validate(doc))
    assert not [o for o in objects if o["kind"] == "CronJob"]


@pytest.mark.parametrize(
    ("change", "field", "phrase"),
    [
        (
            ("training", "modelStoreUri", "file:///srv/models"),
            "spec.training.modelStoreUri",
            "pvc://",
        ),
        (("training", "logUri", "file:///srv/log"), "spec.training.logUri", "s3:// or pvc://"),
        (
            ("model", "archiveUri", "s3://elsewhere/retrieval-1.mar"),
            "spec.training.modelStoreUri",
            "not in the model store",
        ),
    ],
)
def test_locations_a_cluster_run_cannot_use_are_spec_errors(
    change: tuple[str, str, str], field: str, phrase: str
) -> None:
    doc = retraining_doc()
    section, key, value = change
    doc["spec"][section][key] = value
    with pytest.raises(InvalidResource) as info:
        render_system(RecommenderSystem.model_validate(doc))
    (issue,) = info.value.issues
    assert issue.path == field and phrase in issue.message


def test_the_cronjob_is_applied_with_training_and_pruned_without(
    kube: KubeHandle, pulsar_admin: PulsarAdminHandle
) -> None:
    world = World(kube, pulsar_admin)
    training = retraining_doc()["spec"]["training"]
    world.set_training(training)
    outcome = world.reconcile()
    assert not outcome.warnings, outcome.warnings
    assert world.names("batch/v1", "CronJob") == ["quickstart-training"]
    stored = world.client.list_objects("batch/v1", "CronJob", "default")[0]
    assert stored["spec"]["schedule"] == "0 3 * * *"
    world.patch("RecommenderSystem", "quickstart", {"spec": {"training": None}})
    outcome = world.reconcile()
    assert not outcome.warnings, outcome.warnings
    assert world.names("batch/v1", "CronJob") == []
    assert world.names("apps/v1", "Deployment")  # the rest of the system stays


def test_an_s3_model_store_is_passed_as_its_uri_and_mounts_nothing() -> None:
    doc = retraining_doc()
    doc["spec"]["training"]["modelStoreUri"] = "s3://recsys-models/retrieval"
    doc["spec"]["model"]["archiveUri"] = "s3://recsys-models/retrieval/retrieval-1.mar"
    job = cronjob(doc)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert arguments(job)["--model-store"] == "s3://recsys-models/retrieval"
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]  # only the writable /tmp
    writable = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert writable == {"/tmp"}
