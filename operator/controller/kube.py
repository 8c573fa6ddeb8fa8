"""Reading and writing Kubernetes objects by apiVersion/kind, quietly.

`apply` writes only when the live object differs from the desired one in a
field the operator sets: a reconcile of an unchanged system makes GETs and no
writes, and a child edited by hand is patched back. Values the API server adds
(defaults, status, managed fields) are ignored; quantities compare by value
(the server may print 2048Mi as 2Gi).

A field the desired object no longer has is removed too: each child keeps what was
last applied in the `recsys.dev/last-applied` annotation (as `kubectl apply` does),
and the patch sets to null what that had and the desired object dropped. Server-side
apply would do it with field ownership, but merge patches are what every API server
(and the test emulator) treats the same. `sync` also deletes the children a system
owns that its desired state no longer contains (a switched autoscaler, a removed
policy's PDBs, a finished canary).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from recsys_contracts.api_base import quantity_value
from recsys_operator.api.base import GROUP, VERSION

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 30.0  # seconds; a stuck API call must not hold a reconcile forever
LAST_APPLIED = "recsys.dev/last-applied"
# Never removed when dropped: a Deployment's replicas go to its autoscaler, and removing
# the field would reset the Deployment to one replica until the autoscaler acts.
KEPT_WHEN_DROPPED = frozenset({("spec", "replicas")})

# (apiVersion, kind) -> (plural, namespaced). Only what the operator touches.
KNOWN_KINDS: dict[tuple[str, str], tuple[str, bool]] = {
    ("v1", "ConfigMap"): ("configmaps", True),
    ("v1", "Service"): ("services", True),
    ("v1", "Secret"): ("secrets", True),
    ("v1", "Namespace"): ("namespaces", False),
    ("v1", "Pod"): ("pods", True),
    ("v1", "ServiceAccount"): ("serviceaccounts", True),
    ("rbac.authorization.k8s.io/v1", "Role"): ("roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("rolebindings", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("networkpolicies", True),
    ("apps/v1", "Deployment"): ("deployments", True),
    ("batch/v1", "CronJob"): ("cronjobs", True),
    ("ray.io/v1", "RayCronJob"): ("raycronjobs", True),
    ("ray.io/v1", "RayJob"): ("rayjobs", True),
    ("batch/v1", "Job"): ("jobs", True),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("horizontalpodautoscalers", True),
    ("policy/v1", "PodDisruptionBudget"): ("poddisruptionbudgets", True),
    ("keda.sh/v1alpha1", "ScaledObject"): ("scaledobjects", True),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): ("triggerauthentications", True),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("servicemonitors", True),
    ("monitoring.coreos.com/v1", "PrometheusRule"): ("prometheusrules", True),
    (f"{GROUP}/{VERSION}", "RecommenderSystem"): ("recommendersystems", True),
    (f"{GROUP}/{VERSION}", "ScalingPolicy"): ("scalingpolicies", True),
}


def resource_path(
    api_version: str, kind: str, namespace: str | None, name: str | None = None
) -> str:
    plural, namespaced = KNOWN_KINDS[(api_version, kind)]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = prefix + (f"/namespaces/{namespace}" if namespaced and namespace else "") + f"/{plural}"
    return path + (f"/{name}" if name else "")


def covers(live: Any, desired: Any) -> bool:
    """True when every field of `desired` has the same value in `live` (extra live fields are fine)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(covers(live.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(covers(lv, dv) for lv, dv in zip(live, desired, strict=True))
        )
    if live == desired:
        return True
    if (
        isinstance(live, str | int)
        and isinstance(desired, str | int)
        and not isinstance(live, bool)
    ):
        try:
            return quantity_value(str(live)) == quantity_value(str(desired))
        except (ValueError, KeyError):
            return False
    return False


def dropped_fields(last: Any, desired: Any, path: tuple[str, ...] = ()) -> dict[str, Any]:
    """A merge patch of nulls for each key `last` had and `desired` no longer has.

    Lists need nothing: a merge patch replaces a list whole.
    """
    if not isinstance(last, dict) or not isinstance(desired, dict):
        return {}
    patch: dict[str, Any] = {}
    for key, value in last.items():
        if (*path, key) in KEPT_WHEN_DROPPED:
            continue
        if key not in desired:
            patch[key] = None
        else:
            nested = dropped_fields(value, desired[key], (*path, key))
            if nested:
                patch[key] = nested
    return patch


def _still_there(live: Any, removal: dict[str, Any]) -> bool:
    """Whether `live` still has any field the removal patch sets to null."""
    if not isinstance(live, dict):
        return False
    return any(
        key in live if value is None else _still_there(live[key], value)
        for key, value in removal.items()
        if key in live
    )


def _merged(patch: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    result = dict(patch)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merged(result[key], value)
        else:
            result[key] = value
    return result


def _last_applied(live: dict[str, Any]) -> Any:
    text = ((live.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}  # edited by hand into nonsense: remove nothing, rewrite it


def _with_last_applied(wanted: dict[str, Any]) -> dict[str, Any]:
    """`wanted` with the annotation recording it (compact JSON, keys sorted: stable)."""
    record = json.dumps(wanted, sort_keys=True, separators=(",", ":"))
    meta = dict(wanted.get("metadata") or {})
    meta["annotations"] = {**(meta.get("annotations") or {}), LAST_APPLIED: record}
    return {**wanted, "metadata": meta}


def owned_by(obj: dict[str, Any], owner_uid: str) -> bool:
    references = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(reference.get("uid") == owner_uid for reference in references)


def api_message(exc: ApiException) -> str:
    """The API server's own message (its Status body), else the HTTP reason."""
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.reason or "no reason given")


@dataclass
class ApplyResult:
    kind: str
    name: str
    action: str  # created | patched | unchanged
    live: dict[str, Any]  # the object as the server returned it

    def __str__(self) -> str:
        return f"{self.kind}/{self.name} {self.action}"


@dataclass
class SyncResult:
    applied: list[ApplyResult]
    deleted: list[str]  # "Kind/name deleted"
    # What the API server refused (an admission webhook, a ResourceQuota, an immutable
    # field, a missing permission): "apply Kind/name: HTTP 403: its message".
    failed: list[str] = field(default_factory=list)


class KubeClient:
    """A thin JSON-in, JSON-out client on top of kubernetes.client.ApiClient."""

    def __init__(self, api_client: client.ApiClient | None = None):
        self.api = api_client or client.ApiClient()

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str | None = None,
        query: list[tuple[str, str]] | None = None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        # kubernetes>=35 (openapi-generator 7): serialize (auth, query) then call.
        method, url, headers, body, _ = self.api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(
            method, url, header_params=headers, body=body, _request_timeout=REQUEST_TIMEOUT
        )
        data = response.read()
        if response.status >= 400:
            raise ApiException(status=response.status, reason=response.reason, body=data)
        return json.loads(data) if data else None

    def served_api_groups(self) -> set[str]:
        """The names of the API groups the cluster serves (discovery: GET /apis)."""
        groups = self._call("GET", "/apis") or {}
        return {str(g.get("name")) for g in groups.get("groups", [])}

    def served_kinds(self, api_version: str) -> set[str]:
        """The kinds one group version serves (discovery: GET /apis/GROUP/VERSION); none
        when the cluster does not serve it."""
        try:
            resources = self._call("GET", f"/apis/{api_version}") or {}
        except ApiException as exc:
            if exc.status == 404:
                return set()
            raise
        return {str(r.get("kind")) for r in resources.get("resources", []) if "/" not in r["name"]}

    def get(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        try:
            return self._call("GET", resource_path(api_version, kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list_objects(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        result = self._call("GET", resource_path(api_version, kind, namespace), query=query)
        return list((result or {}).get("items", []))

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        return self._call("POST", path, obj, "application/json")

    def merge_patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        patch: dict[str, Any],
        subresource: str = "",
    ) -> dict[str, Any]:
        path = resource_path(api_version, kind, namespace, name) + (
            f"/{subresource}" if subresource else ""
        )
        return self._call("PATCH", path, patch, "application/merge-patch+json")

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        try:
            self._call("DELETE", resource_path(api_version, kind, namespace, name))
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def apply(
        self, desired: dict[str, Any], live: dict[str, Any] | None = None, *, known: bool = False
    ) -> ApplyResult:
        """Create `desired`, or merge-patch the live object back to it; no write when it already matches.

        `known=True` means the caller already looked (`live` is the object or None), saving a GET.
        """
        meta = desired["metadata"]
        api_version, kind, namespace, name = (
            desired["apiVersion"],
            desired["kind"],
            meta.get("namespace"),
            meta["name"],
        )
        if not known:
            live = self.get(api_version, kind, namespace, name)
        wanted = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "status")}
        wanted = _with_last_applied(wanted)
        if live is None:
            try:
                created = {**desired, "metadata": wanted["metadata"]}
                return ApplyResult(kind, name, "created", self.create(created))
            except ApiException as exc:
                if (
                    exc.status != 409
                ):  # created meanwhile (e.g. by a concurrent reconcile): patch below
                    raise
                live = self.get(api_version, kind, namespace, name) or {}
        removal = dropped_fields(_last_applied(live), wanted)
        if covers(live, wanted) and not _still_there(live, removal):
            return ApplyResult(kind, name, "unchanged", live)
        patch = _merged(removal, wanted)
        return ApplyResult(
            kind, name, "patched", self.merge_patch(api_version, kind, namespace, name, patch)
        )

    def apply_all(self, objects: list[dict[str, Any]], label_selector: str) -> list[ApplyResult]:
        """Apply every object, reading the live ones with one LIST per kind (not one GET each)."""
        return self.sync(objects, label_selector).applied

    def sync(
        self,
        objects: list[dict[str, Any]],
        label_selector: str,
        *,
        namespace: str | None = None,
        prune_kinds: tuple[tuple[str, str], ...] = (),
        prune_first: tuple[tuple[str, str], ...] = (),
        owner_uid: str | None = None,
    ) -> SyncResult:
        """Apply every object, then delete what `owner_uid` owns (of `prune_kinds`, in
        `namespace`, matching `label_selector`) that `objects` does not contain; those
        of `prune_first` (kinds among `prune_kinds`) before applying anything.

        One LIST per kind serves both: no GET per object. A kind the API does not
        serve (no KEDA, no Prometheus operator) has nothing to prune. A read or write
        the API server refuses is recorded in `failed`, and the other objects are
        still applied: one refused child does not hold back the rest.
        """
        live: dict[tuple[str, str], dict[str, dict[str, Any]] | None] = {}
        failed: list[str] = []

        def refused(what: str, exc: ApiException) -> None:
            failed.append(f"{what}: HTTP {exc.status}: {api_message(exc)}")

        def live_of(
            api_version: str, kind: str, in_namespace: str | None
        ) -> dict[str, dict[str, Any]] | None:
            """The live objects of a kind by name; None when they could not be listed."""
            if (api_version, kind) not in live:
                items: list[dict[str, Any]] | None
                try:
                    items = self.list_objects(api_version, kind, in_namespace, label_selector)
                except ApiException as exc:
                    items = None
                    if exc.status == 404 and (api_version, kind) in prune_kinds:
                        items = []
                    else:
                        refused(f"list {KNOWN_KINDS[(api_version, kind)][0]}", exc)
                live[(api_version, kind)] = (
                    None if items is None else {item["metadata"]["name"]: item for item in items}
                )
            return live[(api_version, kind)]

        wanted = {(obj["apiVersion"], obj["kind"], obj["metadata"]["name"]) for obj in objects}
        deleted: list[str] = []

        def prune(kinds: tuple[tuple[str, str], ...]) -> None:
            if owner_uid is None:
                return  # ownership unknown: delete nothing
            for api_version, kind in kinds:
                for name, obj in sorted((live_of(api_version, kind, namespace) or {}).items()):
                    if (api_version, kind, name) in wanted or not owned_by(obj, owner_uid):
                        continue
                    try:
                        if self.delete(api_version, kind, namespace, name):
                            deleted.append(f"{kind}/{name} deleted")
                    except ApiException as exc:
                        refused(f"delete {kind}/{name}", exc)

        prune(tuple(kind for kind in prune_kinds if kind in prune_first))
        applied = []
        for obj in objects:
            kind, name = obj["kind"], obj["metadata"]["name"]
            current = live_of(obj["apiVersion"], kind, obj["metadata"].get("namespace"))
            if current is None:
                continue  # the kind's LIST was refused: recorded once
            try:
                applied.append(self.apply(obj, current.get(name), known=True))
            except ApiException as exc:
                refused(f"apply {kind}/{name}", exc)
        prune(tuple(kind for kind in prune_kinds if kind not in prune_first))
        return SyncResult(applied, deleted, failed)
