"""Self-tests: the emulators and the Kopf runner behave as their docstrings say."""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from .accounting import describe
from .fixtures import KEDA_CRDS, REPO_ROOT, KubeHandle, PulsarAdminHandle, wait_for

GROUP, VERSION, PLURAL = "recsys.dev", "v1alpha1", "recommendersystems"
QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"


def quickstart(name: str = "quickstart") -> dict[str, Any]:
    body = yaml.safe_load(QUICKSTART.read_text())
    body["metadata"]["name"] = name
    return body


def custom_objects(kube: KubeHandle) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube.api_client)


def create_recsys(kube: KubeHandle, name: str = "quickstart") -> Any:
    return custom_objects(kube).create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, quickstart(name)
    )


def get_recsys(kube: KubeHandle, name: str = "quickstart") -> Any:
    return custom_objects(kube).get_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, name
    )


def merge_patch_recsys(kube: KubeHandle, patch: dict[str, Any], name: str = "quickstart") -> Any:
    return custom_objects(kube).patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, name, patch
    )


def patch_recsys_status(kube: KubeHandle, patch: dict[str, Any]) -> Any:
    return custom_objects(kube).patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "quickstart", patch
    )


def list_recsys(kube: KubeHandle, **options: Any) -> Any:
    return custom_objects(kube).list_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, **options
    )


# --- the Kubernetes emulator through the kubernetes client ------------------------------


def test_create_answers_201_with_the_object_as_stored(kube: KubeHandle) -> None:
    body: Any
    body, status, _ = custom_objects(kube).create_namespaced_custom_object_with_http_info(
        GROUP, VERSION, "default", PLURAL, quickstart()
    )
    assert status == 201
    meta = body["metadata"]
    assert meta["namespace"] == "default"
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
    assert meta["generation"] == 1
    assert get_recsys(kube) == body


def test_second_create_is_409_and_missing_objects_are_404(kube: KubeHandle) -> None:
    create_recsys(kube)
    with pytest.raises(ApiException) as conflict:
        create_recsys(kube)
    assert conflict.value.status == 409
    with pytest.raises(ApiException) as missing:
        get_recsys(kube, "absent")
    assert missing.value.status == 404
    assert json.loads(missing.value.body or "{}")["reason"] == "NotFound"


def test_spec_changes_bump_generation_and_status_or_metadata_changes_do_not(
    kube: KubeHandle,
) -> None:
    created = create_recsys(kube)
    spec_changed = merge_patch_recsys(kube, {"spec": {"model": {"version": "2"}}})
    assert spec_changed["metadata"]["generation"] == 2
    assert spec_changed["spec"]["model"]["version"] == "2"
    assert spec_changed["spec"]["model"]["name"] == "retrieval"  # merged, not replaced

    status_changed = patch_recsys_status(kube, {"status": {"observedGeneration": 2}})
    labelled = merge_patch_recsys(kube, {"metadata": {"labels": {"team": "ranking"}}})
    assert status_changed["metadata"]["generation"] == labelled["metadata"]["generation"] == 2
    assert labelled["status"] == {"observedGeneration": 2}
    versions = [
        int(body["metadata"]["resourceVersion"])
        for body in (created, spec_changed, status_changed, labelled)
    ]
    assert versions == sorted(set(versions)), "every write bumps resourceVersion"


def test_status_subresource_separates_status_from_the_rest(kube: KubeHandle) -> None:
    create_recsys(kube)
    ignored = merge_patch_recsys(kube, {"status": {"stableVersion": "1"}})
    assert "status" not in ignored
    only_status = patch_recsys_status(
        kube, {"status": {"stableVersion": "1"}, "spec": {"model": {"version": "9"}}}
    )
    assert only_status["status"] == {"stableVersion": "1"}
    assert only_status["spec"]["model"]["version"] == "1"


def test_no_op_patch_keeps_the_version(kube: KubeHandle) -> None:
    created = create_recsys(kube)
    same = merge_patch_recsys(kube, {"spec": {"model": {"version": "1"}}})
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def test_list_has_kind_api_version_and_honours_label_selectors(kube: KubeHandle) -> None:
    create_recsys(kube, "b")
    create_recsys(kube, "a")
    merge_patch_recsys(kube, {"metadata": {"labels": {"tier": "gold"}}}, name="b")
    listing = list_recsys(kube)
    assert listing["kind"] == "RecommenderSystemList"
    assert listing["apiVersion"] == f"{GROUP}/{VERSION}"
    assert int(listing["metadata"]["resourceVersion"]) > 0
    assert [item["metadata"]["name"] for item in listing["items"]] == ["a", "b"]
    gold = list_recsys(kube, label_selector="tier=gold")
    assert [item["metadata"]["name"] for item in gold["items"]] == ["b"]
    namespaces = kube.get("/api/v1/namespaces")
    assert namespaces["kind"] == "NamespaceList"
    assert [ns["metadata"]["name"] for ns in namespaces["items"]] == ["default"]


def test_finalizers_hold_deletion_until_removed(kube: KubeHandle) -> None:
    create_recsys(kube)
    merge_patch_recsys(kube, {"metadata": {"finalizers": ["recsys.dev/topics"]}})
    custom_objects(kube).delete_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "quickstart"
    )
    terminating = get_recsys(kube)
    assert terminating["metadata"]["deletionTimestamp"]

    merge_patch_recsys(kube, {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as gone:
        get_recsys(kube)
    assert gone.value.status == 404


def test_json_patch_with_a_stale_resource_version_test_is_422(kube: KubeHandle) -> None:
    created = create_recsys(kube)
    merge_patch_recsys(kube, {"spec": {"model": {"version": "2"}}})
    stale = [
        {
            "op": "test",
            "path": "/metadata/resourceVersion",
            "value": created["metadata"]["resourceVersion"],
        },
        {"op": "add", "path": "/metadata/finalizers", "value": ["x"]},
    ]
    with pytest.raises(ApiException) as rejected:
        custom_objects(kube).patch_namespaced_custom_object(
            GROUP,
            VERSION,
            "default",
            PLURAL,
            "quickstart",
            stale,
            _content_type="application/json-patch+json",
        )
    assert rejected.value.status == 422


def test_watch_streams_added_modified_deleted_in_order(kube: KubeHandle) -> None:
    events: list[tuple[str, str]] = []
    watching = threading.Event()

    def watch_recsys() -> None:
        stream = watch.Watch().stream(
            custom_objects(kube).list_namespaced_custom_object,
            GROUP,
            VERSION,
            "default",
            PLURAL,
            timeout_seconds=10,
        )
        watching.set()
        for event in stream:
            events.append((event["type"], event["object"]["metadata"]["resourceVersion"]))
            if event["type"] == "DELETED":
                return

    watcher = threading.Thread(target=watch_recsys, daemon=True)
    watcher.start()
    create_recsys(kube)  # before or after the watch connects: replayed as ADDED either way
    watching.wait(5)
    wait_for(lambda: events)
    patched = merge_patch_recsys(kube, {"spec": {"model": {"version": "2"}}})
    custom_objects(kube).delete_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "quickstart"
    )
    watcher.join(10)
    assert [kind for kind, _ in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert events[1][1] == patched["metadata"]["resourceVersion"]
    assert int(events[2][1]) > int(events[1][1])


def test_watch_replays_only_newer_objects_and_ends_after_its_timeout(kube: KubeHandle) -> None:
    first = create_recsys(kube, "first")
    create_recsys(kube, "second")
    since = first["metadata"]["resourceVersion"]
    path = f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}"
    url = f"{kube.url}{path}?watch=true&resourceVersion={since}&timeoutSeconds=1"
    with urllib.request.urlopen(url, timeout=10) as stream:  # returns when the server ends it
        events = [json.loads(line) for line in stream if line.strip()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "second")]


def test_write_counting_sees_writes_and_not_reads(kube: KubeHandle) -> None:
    create_recsys(kube)
    mark = kube.emulator.mark()
    get_recsys(kube)
    list_recsys(kube)
    assert kube.emulator.writes_since(mark) == []
    assert len(kube.emulator.requests_since(mark, method="GET", resource=PLURAL)) == 2

    merge_patch_recsys(kube, {"spec": {"model": {"version": "2"}}})
    writes = kube.emulator.writes_since(mark)
    assert (
        describe(writes) == f"PATCH /apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}/quickstart"
    )


def test_injected_failure_on_a_write_answers_500_but_the_write_happens(kube: KubeHandle) -> None:
    create_recsys(kube)
    kube.emulator.fail_next(1, method="PATCH", path=f"/apis/{GROUP}/*")
    with pytest.raises(ApiException) as failed:
        merge_patch_recsys(kube, {"spec": {"model": {"version": "2"}}})
    assert failed.value.status == 500
    assert get_recsys(kube)["spec"]["model"]["version"] == "2"  # as when a response is lost
    assert (
        merge_patch_recsys(kube, {"spec": {"model": {"version": "3"}}})["metadata"]["generation"]
        == 3
    )


def test_unserved_resources_404_until_their_crd_is_installed(kube: KubeHandle) -> None:
    scaled_object = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "serving"},
        "spec": {"scaleTargetRef": {"name": "serving"}},
    }
    objects = custom_objects(kube)
    with pytest.raises(ApiException) as unserved:
        objects.create_namespaced_custom_object(
            "keda.sh", "v1alpha1", "default", "scaledobjects", scaled_object
        )
    assert unserved.value.status == 404
    kube.install_crds(*KEDA_CRDS)
    created: Any = objects.create_namespaced_custom_object(
        "keda.sh", "v1alpha1", "default", "scaledobjects", scaled_object
    )
    assert created["metadata"]["namespace"] == "default"


def test_discovery_serves_builtin_groups_and_installed_crds(kube: KubeHandle) -> None:
    groups = {group["name"] for group in kube.get("/apis")["groups"]}
    assert {"apps", "autoscaling", "policy", "apiextensions.k8s.io", GROUP} <= groups
    assert "storage.k8s.io" not in groups  # served by a real cluster, unused here
    assert "configmaps" in {r["name"] for r in kube.get("/api/v1")["resources"]}
    resources = {r["name"]: r for r in kube.get(f"/apis/{GROUP}/{VERSION}")["resources"]}
    assert resources[PLURAL]["shortNames"] == ["recsys"]
    assert resources[PLURAL]["namespaced"] is True
    assert resources[f"{PLURAL}/status"]["shortNames"] == []


def test_core_discovery_and_stored_objects_name_their_api_version(kube: KubeHandle) -> None:
    assert kube.get("/api/v1")["groupVersion"] == "v1"  # not "/v1": kubectl needs it exact
    namespace = kube.get("/api/v1/namespaces/default")
    assert (namespace["apiVersion"], namespace["kind"]) == ("v1", "Namespace")
    scale = {r["name"]: r for r in kube.get("/apis/apps/v1")["resources"]}["deployments/scale"]
    assert (scale["group"], scale["version"], scale["kind"]) == ("autoscaling", "v1", "Scale")


def test_answering_a_request_never_rereads_the_request_log(
    kube: KubeHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # kmock's own dispatch filtered the whole log for each request (seconds per GET after
    # a few thousand requests); the emulator judges each request by itself.
    from kmock._internal import dsl

    def scan(self: Any) -> Any:
        raise AssertionError("the request log was scanned")

    kube.emulator.fail_next(1, method="GET", path="/api/v1/namespaces/default/configmaps")
    monkeypatch.setattr(dsl.Root, "__iter__", scan)
    for _ in range(3):
        assert kube.get("/api/v1/namespaces/default")["metadata"]["name"] == "default"
    with pytest.raises(urllib.error.HTTPError) as injected:
        kube.get("/api/v1/namespaces/default/configmaps")
    assert injected.value.code == 500
    assert kube.get("/api/v1/namespaces/default/configmaps")["items"] == []


def test_generate_name_gives_each_object_its_own_name(kube: KubeHandle) -> None:
    event = {"kind": "Event", "metadata": {"generateName": "kopf-event-"}, "reason": "Test"}
    first = kube.post("/api/v1/namespaces/default/events", event)
    second = kube.post("/api/v1/namespaces/default/events", event)
    assert first["metadata"]["name"].startswith("kopf-event-")
    assert first["metadata"]["name"] != second["metadata"]["name"]


# --- kubectl ----------------------------------------------------------------------------


@pytest.mark.tools
def test_kubectl_applies_gets_waits_for_and_server_side_applies(
    kube: KubeHandle, tmp_path: Path
) -> None:
    applied = kube.kubectl("apply", "--validate=false", "-f", str(QUICKSTART))
    assert "recommendersystem.recsys.dev/quickstart created" in applied.stdout
    listed = kube.kubectl("get", "recsys", "-n", "default")
    assert "quickstart" in listed.stdout
    again = kube.kubectl("apply", "--validate=false", "-f", str(QUICKSTART))
    assert "unchanged" in again.stdout
    assert get_recsys(kube)["metadata"]["generation"] == 1
    # kubectl wait lists, then watches (a watch-list): set the condition once it watches.
    mark = kube.emulator.mark()
    waited: list[subprocess.CompletedProcess[str]] = []
    wait = ("wait", "--for=condition=Ready", "recsys/quickstart", "--timeout=30s")
    waiting = threading.Thread(target=lambda: waited.append(kube.kubectl(*wait, check=False)))
    waiting.start()
    wait_for(
        lambda: any(r.params.get("watch") == "true" for r in kube.emulator.requests_since(mark))
    )
    patch_recsys_status(kube, {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    waiting.join(30)
    assert waited and "condition met" in waited[0].stdout, waited

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"apiVersion: {GROUP}/{VERSION}\nkind: ScalingPolicy\n"
        "metadata: {name: default, namespace: default}\nspec: {engine: hpa}\n"
    )
    server_side = kube.kubectl("apply", "--server-side", "--validate=false", "-f", str(policy))
    assert "scalingpolicy.recsys.dev/default serverside-applied" in server_side.stdout


# --- Kopf against the emulator ----------------------------------------------------------


def kopf_events_about(kube: KubeHandle, name: str) -> list[str]:
    events = kube.get("/api/v1/namespaces/default/events")["items"]
    return [event["reason"] for event in events if event["involvedObject"]["name"] == name]


def test_kopf_operator_handles_create_and_delete_with_a_finalizer(
    kube: KubeHandle, run_operator: Any
) -> None:
    registry = kopf.OperatorRegistry()
    deleted: list[str] = []

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def created(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        patch.status["stableVersion"] = "1"
        kopf.info(body, reason="Serving", message="stable version 1")  # a Kubernetes Event

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def removed(name: str, **_: Any) -> None:
        deleted.append(name)

    run_operator(registry=registry)
    create_recsys(kube)
    wait_for(lambda: get_recsys(kube).get("status", {}).get("stableVersion") == "1")
    assert get_recsys(kube)["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
    wait_for(
        lambda: kopf_events_about(kube, "quickstart") == ["Serving"]
    )  # POSTed with a generateName

    custom_objects(kube).delete_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "quickstart"
    )
    wait_for(lambda: deleted == ["quickstart"])

    def gone() -> bool:
        try:
            get_recsys(kube)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone)


def test_kopf_runs_a_handlers_module_from_the_default_registry(
    kube: KubeHandle, run_operator: Any, tmp_path: Path
) -> None:
    handlers = tmp_path / "handlers.py"
    handlers.write_text(
        "import kopf\n"
        f"@kopf.on.create({GROUP!r}, {VERSION!r}, {PLURAL!r})\n"
        "def mark(patch, **_):\n"
        "    patch.status['stableVersion'] = 'from-module'\n"
    )
    # A fresh default registry, so the module's handlers stay out of other tests' operators.
    default_registry = kopf.get_default_registry()
    kopf.set_default_registry(kopf.OperatorRegistry())
    try:
        run_operator(handlers)
    finally:
        kopf.set_default_registry(default_registry)
    create_recsys(kube)
    wait_for(lambda: get_recsys(kube).get("status", {}).get("stableVersion") == "from-module")


# --- the Pulsar admin emulator ----------------------------------------------------------


def pulsar(
    admin: PulsarAdminHandle, method: str, path: str, body: Any = None, token: str | None = None
) -> tuple[int, Any]:
    """One admin request: (status, decoded JSON body or None)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{admin.url}/admin/v2{path}", data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    return status, json.loads(text) if text else None


TOPIC = "/persistent/recsys/events/interactions"


def test_pulsar_tenants_and_namespaces(pulsar_admin: PulsarAdminHandle) -> None:
    assert pulsar(pulsar_admin, "GET", "/clusters") == (200, ["standalone"])
    tenant = {"adminRoles": [], "allowedClusters": ["standalone"]}
    assert pulsar(pulsar_admin, "GET", "/tenants/recsys")[0] == 404
    assert pulsar(pulsar_admin, "PUT", "/namespaces/recsys/events")[0] == 404
    assert pulsar(pulsar_admin, "PUT", "/tenants/recsys", {"allowedClusters": []})[0] == 412
    assert pulsar(pulsar_admin, "PUT", "/tenants/recsys", tenant) == (204, None)
    assert pulsar(pulsar_admin, "PUT", "/tenants/recsys", tenant) == (
        409,
        {"reason": "Tenant already exist"},
    )
    assert pulsar(pulsar_admin, "GET", "/tenants/recsys") == (200, tenant)
    assert pulsar(pulsar_admin, "PUT", "/namespaces/recsys/events") == (204, None)
    assert pulsar(pulsar_admin, "PUT", "/namespaces/recsys/events")[0] == 409
    assert pulsar(pulsar_admin, "GET", "/namespaces/recsys") == (200, ["recsys/events"])


def test_pulsar_partitioned_topics_and_their_policies(pulsar_admin: PulsarAdminHandle) -> None:
    assert pulsar(pulsar_admin, "PUT", f"{TOPIC}/partitions", 4)[0] == 404  # no namespace
    pulsar_admin.emulator.tenants["recsys"] = {"adminRoles": [], "allowedClusters": ["standalone"]}
    pulsar_admin.emulator.namespaces.add("recsys/events")
    assert pulsar(pulsar_admin, "GET", f"{TOPIC}/partitions")[0] == 404
    assert pulsar(pulsar_admin, "PUT", f"{TOPIC}/partitions", 2) == (204, None)
    assert pulsar(pulsar_admin, "PUT", f"{TOPIC}/partitions", 2)[0] == 409
    assert pulsar(pulsar_admin, "GET", f"{TOPIC}/partitions") == (200, {"partitions": 2})
    assert pulsar(pulsar_admin, "POST", f"{TOPIC}/partitions", 4) == (204, None)
    assert pulsar(pulsar_admin, "POST", f"{TOPIC}/partitions", 3)[0] == 422  # never fewer
    assert pulsar(pulsar_admin, "GET", "/persistent/recsys/events/partitioned") == (
        200,
        ["persistent://recsys/events/interactions"],
    )
    assert len(pulsar(pulsar_admin, "GET", "/persistent/recsys/events")[1]) == 4

    assert pulsar(pulsar_admin, "GET", f"{TOPIC}/retention") == (204, None)
    retention = {"retentionTimeInMinutes": 1440, "retentionSizeInMB": 1024}
    assert pulsar(pulsar_admin, "POST", f"{TOPIC}/retention", retention) == (204, None)
    assert pulsar(pulsar_admin, "GET", f"{TOPIC}/retention") == (200, retention)
    quota = {"limitSize": 512 * 2**20, "limitTime": -1, "policy": "producer_request_hold"}
    quota_path = f"{TOPIC}/backlogQuota?backlogQuotaType=destination_storage"
    assert pulsar(pulsar_admin, "POST", quota_path, quota) == (204, None)
    assert pulsar(pulsar_admin, "GET", f"{TOPIC}/backlogQuotaMap") == (
        200,
        {"destination_storage": quota},
    )
    too_big = quota | {"limitSize": 1024 * 2**20}  # Pulsar wants it strictly under retention
    assert pulsar(pulsar_admin, "POST", quota_path, too_big)[0] == 412

    assert pulsar(pulsar_admin, "DELETE", f"{TOPIC}/partitions?force=true") == (204, None)
    assert pulsar(pulsar_admin, "DELETE", f"{TOPIC}/partitions?force=true")[0] == 404


def test_pulsar_bearer_token_auth(pulsar_admin: PulsarAdminHandle) -> None:
    pulsar_admin.emulator.token = "admin-token"
    pulsar_admin.emulator.forbidden_token = "reader-token"
    assert pulsar(pulsar_admin, "GET", "/clusters")[0] == 401
    assert pulsar(pulsar_admin, "GET", "/clusters", token="wrong")[0] == 401
    assert pulsar(pulsar_admin, "GET", "/clusters", token="reader-token")[0] == 403
    assert pulsar(pulsar_admin, "GET", "/clusters", token="admin-token")[0] == 200


def test_pulsar_injected_failures_then_success_with_accounting(
    pulsar_admin: PulsarAdminHandle,
) -> None:
    admin = pulsar_admin.emulator
    mark = admin.mark()
    admin.fail_next(2, method="PUT", path="/admin/v2/tenants/*")
    tenant = {"adminRoles": [], "allowedClusters": ["standalone"]}
    statuses = [pulsar(pulsar_admin, "PUT", "/tenants/recsys", tenant)[0] for _ in range(3)]
    assert statuses == [500, 500, 204]
    assert pulsar(pulsar_admin, "GET", "/tenants/recsys")[0] == 200
    assert len(admin.writes_since(mark)) == 3
    assert len(admin.requests_since(mark, method="GET", path="/admin/v2/tenants/*")) == 1
    assert "recsys" in admin.tenants
