"""A Kubernetes API server for tests: kmock's `KubernetesEmulator`, strict where clients care.

kmock 0.8 keeps objects in memory and serves discovery, get, list and watch. This
subclass keeps its storage, discovery, reactions and request log, and replaces its
bookkeeping of writes (create, patch, delete) and its list and watch answers with what a
real API server does, where Kopf, kubectl and the kubernetes client rely on it:

- `metadata.namespace` comes from the URL (Kopf drops watch events without it);
  `uid`, `creationTimestamp`, `generateName` are filled in on create;
- every write bumps one global `metadata.resourceVersion`, and a watch event carries
  the same object and version as the response of the write that caused it;
- `metadata.generation` starts at 1 and grows when anything but metadata and status
  changes (and when deletion starts), so `observedGeneration` can be tested;
- POST answers 201 with the object; a duplicate name answers 409 AlreadyExists; a
  missing object 404 NotFound (a Kubernetes `Status`); writes to a resource the API
  does not serve answer 404, as in a cluster without that CRD;
- PATCH understands JSON merge patch and JSON patch (with Kopf's `test` of
  `resourceVersion`, failing with 422), treats strategic merge patch as merge patch;
  a merge patch carrying a stale `metadata.resourceVersion` answers 409 Conflict;
  a patch that changes nothing changes no version and sends no watch event;
- with a `status` subresource, `/status` writes change only `.status` and writes to the
  object itself leave `.status` alone (also on create), as the real API server does;
- DELETE of an object with finalizers sets `deletionTimestamp`; the object goes away
  (with a DELETED event) when its last finalizer is removed;
- lists carry `apiVersion`, `kind: <Kind>List` and `metadata.resourceVersion`, sorted
  by namespace and name; lists and watches honour equality label selectors and the
  `metadata.name`/`metadata.namespace` field selectors, and for events those below
  (others answer 400, as the real server does);
- `open_watches` counts the watch streams receiving events now (a watch request is
  logged a moment before its stream is);
- a watch first replays the objects newer than its `resourceVersion` as ADDED (all of
  them and a closing bookmark for `sendInitialEvents=true`, as kubectl 1.35 asks), then
  streams events in order (nothing written in between is lost) until its
  `timeoutSeconds`; watch responses are `application/json`, which client-go needs;
- discovery serves the core (`v1`), apps, autoscaling/v2, policy, rbac and apiextensions
  groups, and every CustomResourceDefinition created through the API (marked Established);
  stored objects carry their `apiVersion` and `kind` whether the client sent them or not;
- Table responses (`Accept: ...;as=Table`, as `kubectl get` asks, also for watches): the
  name and a CRD's additionalPrinterColumns (see tables.py); built-in kinds get name and age;
- events select by the API server's event fields (`involvedObject.name`, `reason`, `type`,
  ...), as `kubectl describe` and `kubectl get events --field-selector` ask;
- the `scale` subresource of kinds that have one (Deployments): GET and PATCH an
  autoscaling/v1 Scale, which reads and writes `spec.replicas` (`kubectl scale`);
- each request is answered in time independent of how many came before
  (accounting.RequestLog._dispatch); the log itself is kept whole, for `mark()`.

What it does NOT do (never test these behaviours against it):

- no PUT (replace) and no deletecollection: PUT answers 405, a collection DELETE 404;
- no garbage collection by owner references and no controllers: children of a deleted
  owner stay; Deployments get no status, ReplicaSets or Pods (patch `/status` to fake
  it); deleting a CRD or a namespace leaves their objects in place;
- no authorization (RBAC objects are stored, never enforced), no admission, defaulting
  or schema validation: CRD schemas are not checked (validate manifests with
  kubernetes-validate / jsonschema), namespaces need not exist; no OpenAPI documents
  either, so kubectl needs `--validate=false`;
- no per-kind printers of built-in kinds (`kubectl get deploy` shows NAME and AGE only);
  printer-column JSONPath is the subset CRDs use (`.a.b`, `[n]`, `[?(@.k=="v")]`);
- server-side apply (`application/apply-patch+yaml`) is a merge patch that creates a
  missing object: no managedFields, no field ownership, no conflicts;
- strategic merge patch replaces lists instead of merging them by key;
- dry-run requests (`?dryRun=All`) are applied and stored like real ones;
- watches have no history: an object deleted while a client was not watching is never
  reported; no `410 Gone`; bookmarks only end the initial events of a watch-list
  (`sendInitialEvents=true`); an object whose labels stop matching a watch's selector
  is not reported as DELETED;
- a test's injected failure on a write (`fail_next`) answers with the error, but the
  write still happens (as when a response is lost), because kmock records writes
  before it picks the answer.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.resources
import re
import secrets
import string
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml
from kmock._internal import parsing as kmock_parsing

from . import tables
from .accounting import RequestLog, request_header

# Only the API groups an operator of this project reads or writes, to keep discovery small.
BUILTIN_GROUP_VERSIONS = frozenset(
    {
        "v1",
        "apps/v1",
        "batch/v1",
        "autoscaling/v2",
        "policy/v1",
        "networking.k8s.io/v1",
        "rbac.authorization.k8s.io/v1",
        "apiextensions.k8s.io/v1",
    }
)
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
CRD_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
WRITE_ACTIONS = frozenset({kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE})

JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCHES = frozenset(
    {"application/merge-patch+json", "application/strategic-merge-patch+json", APPLY_PATCH}
)

# Metadata only the server sets: a patch that tries to change these is ignored there.
SERVER_METADATA = (
    "uid",
    "name",
    "namespace",
    "creationTimestamp",
    "deletionTimestamp",
    "resourceVersion",
    "generation",
)

Body = dict[str, Any]
Event = dict[str, Any]

# Put on the watch buses by end_watches(): every open watch stream ends when it sees it.
_END_OF_WATCH: Event = {"type": "END-OF-WATCH"}


def _parse_path_with_namespaces(
    path: str, kmock_parse_path: Callable[[str], Any] = kmock_parsing.parse_path
) -> Any:
    """kmock's URL parser, but `/api/v1/namespaces[/NAME[/status|finalize]]` is a Namespace.

    kmock 0.8 takes `namespaces` there for the start of a namespaced path: listing or
    creating namespaces crashes its parser, reading one finds no resource. Kopf lists and
    watches namespaces whenever it serves specific namespaces, so kmock is patched here
    (process-wide, a private function: re-check on a kmock upgrade).
    """
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
        len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
    ):
        name = parts[3] if len(parts) > 3 else None
        subresource = parts[4] if len(parts) > 4 else None
        return kmock_parsing.ParsedPath("", "v1", "namespaces", None, name, subresource)
    return kmock_parse_path(path)


kmock_parsing.parse_path = _parse_path_with_namespaces


@attrs.define(kw_only=True)
class KubeEmulator(RequestLog, kmock.KubernetesEmulator):
    """The API server described in this module's docstring; objects live in `.objects`."""

    _resource_version: int = attrs.field(default=0, init=False)
    # The object each write request answers with, computed in _handle, served by _serve_*.
    _write_results: dict[kmock.Request, Body] = attrs.field(factory=dict, init=False)
    # Watch streams that receive events now (a test waits for a client's watch to be live).
    open_watches: int = attrs.field(default=0, init=False)
    # The additionalPrinterColumns of each custom resource, for Table responses.
    _printer_columns: dict[kmock.resource, list[Body]] = attrs.field(factory=dict, init=False)
    injected_faults: list[Any] = attrs.field(factory=list, init=False)  # by fail_next()

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # What `load_bundled()` loads (a K3s cluster's discovery), without its deprecated API.
        bundled = importlib.resources.files("kmock._internal") / "resources.json.gz"
        self.resources.load_path(Path(str(bundled)))
        for resource in list(self.resources):
            if _group_version(kmock.resource(resource)) not in BUILTIN_GROUP_VERSIONS:
                del self.resources[resource]
        self.fallback[kmock.method.PUT] << _error(
            405, "MethodNotAllowed", "the emulator has no PUT (replace): use PATCH"
        )
        # Ahead of kmock's own watch fallback: client-go (kubectl get -w, kubectl wait) decodes
        # a watch by its content type, which kmock leaves as application/octet-stream.
        watches = (self.fallback**1)[kmock.action.WATCH]
        watches << {"Content-Type": "application/json"} << self._serve_watch

    # --- writes ---------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or request.action not in WRITE_ACTIONS:
            return await self._dispatch(request)  # reads: kmock's reactions, then _serve_*
        async with self._lock:
            result, event = self._write(request)
            self._write_results[request] = result
            if event is not None:
                await self._buses[request.resource].put(event)
        try:
            # Answer through kmock's reactions: a test's injected faults first, else the
            # _serve_* fallbacks below. KubernetesEmulator._handle is skipped on purpose:
            # its own bookkeeping of writes is what _write replaces.
            return await self._dispatch(request)
        finally:
            del self._write_results[request]

    def _write(self, request: kmock.Request) -> tuple[Body, Event | None]:
        resource = self._served_resource(request)
        if request.action == kmock.action.CREATE:
            return self._create(request, request.data)

        key: Any = (resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            if request.action == kmock.action.UPDATE and _content_type(request) == APPLY_PATCH:
                return self._create(request, _patch_document(request))
            raise _not_found(request)
        if request.action == kmock.action.UPDATE:
            return self._update(request, self.objects[key])
        return self._delete(self.objects[key])

    def _create(self, request: kmock.Request, body: Any) -> tuple[Body, Event]:
        assert request.resource is not None
        if not isinstance(body, dict):
            raise _error(415, "UnsupportedMediaType", "the body must be a JSON object")
        meta = dict(body.get("metadata") or {})
        name = meta.get("name") or _generated_name(meta.get("generateName"))
        if not name:
            raise _error(422, "Invalid", "metadata.name or metadata.generateName is required")
        namespace = None
        if self.resources[request.resource].namespaced:
            namespace = request.namespace or meta.get("namespace")
            if namespace is None or meta.get("namespace", namespace) != namespace:
                raise _error(400, "BadRequest", "the namespace of the object does not match")
        key = (request.resource, namespace, name)
        if key in self.objects and not self.objects[key].deleted:
            message = f'{_kind_name(request)} "{name}" already exists'
            raise _error(409, "AlreadyExists", message, name=name, kind=_kind_name(request))

        meta.update(
            name=name,
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            resourceVersion=self._next_resource_version(),
            generation=1,
        )
        meta.pop("deletionTimestamp", None)
        if namespace is not None:
            meta["namespace"] = namespace
        new = {field: value for field, value in body.items() if field != "metadata"}
        # The API server stores every object with its apiVersion and kind, sent or not.
        new["apiVersion"] = _group_version(request.resource)
        new["kind"] = self.resources[request.resource].kind
        new["metadata"] = meta
        if self._has_status_subresource(request.resource):
            new.pop("status", None)
        if request.resource == CRDS:
            new["status"] = self._register_crd(new)

        if key in self.objects:
            self.objects[key].create(new)  # keeps the history of the earlier object
        else:
            self.objects[key] = new
        return new, {"type": "ADDED", "object": new}

    def _update(self, request: kmock.Request, obj: kmock.Object) -> tuple[Body, Event | None]:
        assert request.resource is not None
        current = obj.raw
        current_meta = current.get("metadata", {})
        patch = _patch_document(request)
        if isinstance(patch, dict):  # optimistic concurrency, when the patch asks for it
            expected = (patch.get("metadata") or {}).get("resourceVersion")
            if expected not in (None, current_meta.get("resourceVersion")):
                raise _error(409, "Conflict", "the object has been modified; reload and retry")
        subresource = request.subresource
        if subresource == "scale":  # a Scale in, the object's spec.replicas changed
            scale = _apply_patch(_scale_of(current), patch, _content_type(request))
            replicas = (scale.get("spec") or {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                raise _error(422, "Invalid", "spec.replicas of a Scale must be an integer >= 0")
            patched = _merge_patch(current, {"spec": {"replicas": replicas}})
        else:
            patched = _apply_patch(current, patch, _content_type(request))

        if subresource == "status":
            new = {field: value for field, value in current.items() if field != "status"}
            if "status" in patched:
                new["status"] = patched["status"]
        elif subresource in (None, "scale"):
            if subresource == "scale" and not self._has_subresource(request.resource, "scale"):
                raise _error(404, "NotFound", "the resource has no scale subresource")
            new = dict(patched)
            if self._has_status_subresource(request.resource):
                new.pop("status", None)
                if "status" in current:
                    new["status"] = current["status"]
        else:
            raise _error(404, "NotFound", f"the emulator has no {subresource} subresource")

        meta = dict(new.get("metadata") or {})
        for field in SERVER_METADATA:
            meta.pop(field, None)
            if field in current_meta:
                meta[field] = current_meta[field]
        new["metadata"] = meta
        answer = _scale_of if subresource == "scale" else (lambda body: body)
        if new == current:
            return answer(current), None  # a no-op patch: no new version, no watch event

        if _without_metadata_and_status(new) != _without_metadata_and_status(current):
            meta["generation"] = current_meta.get("generation", 0) + 1
        meta["resourceVersion"] = self._next_resource_version()
        obj.history.append(new)
        if request.resource == CRDS:
            self._register_crd(new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            obj.delete()  # the last finalizer is gone: the deletion completes
            return new, {"type": "DELETED", "object": new}
        return answer(new), {"type": "MODIFIED", "object": new}

    def _delete(self, obj: kmock.Object) -> tuple[Body, Event | None]:
        current = obj.raw
        meta = dict(current.get("metadata", {}))
        if meta.get("deletionTimestamp"):
            return current, None  # already being deleted, waiting for its finalizers
        meta["resourceVersion"] = self._next_resource_version()
        if meta.get("finalizers"):
            # As the real API server: deletion is a write that also bumps the generation.
            meta.update(
                deletionTimestamp=_now(),
                deletionGracePeriodSeconds=0,
                generation=meta.get("generation", 0) + 1,
            )
            new = current | {"metadata": meta}
            obj.history.append(new)
            return new, {"type": "MODIFIED", "object": new}
        obj.delete()
        gone = current | {"metadata": meta}
        return gone, {"type": "DELETED", "object": gone}

    def _served_resource(self, request: kmock.Request) -> kmock.resource:
        """The request's resource, if the API serves it (built in, or from a CRD); else 404."""
        if request.resource is None or request.resource not in self.resources:
            raise _error(404, "NotFound", "the server could not find the requested resource")
        return request.resource

    def _stored_objects(self, resource: kmock.resource) -> list[Body]:
        """The current objects of a resource (call it under self._lock)."""
        return [
            obj.raw
            for (stored_resource, _, _), obj in self.objects.items()
            if stored_resource == resource and not obj.deleted
        ]

    def _next_resource_version(self) -> str:
        self._resource_version += 1
        return str(self._resource_version)

    def _has_status_subresource(self, resource: kmock.resource) -> bool:
        return self._has_subresource(resource, "status")

    def _has_subresource(self, resource: kmock.resource, subresource: str) -> bool:
        return resource in self.resources and subresource in self.resources[resource].subresources

    def _register_crd(self, crd: Body) -> Body:
        """Serve the CRD's resources from now on; returns the status the API server gives it."""
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        for version in spec.get("versions", []):
            if version.get("served", True):
                resource = kmock.resource(spec["group"], version["name"], names["plural"])
                self.resources[resource] = kmock.ResourceInfo(
                    kind=names.get("kind"),
                    singular=names.get("singular"),
                    namespaced=spec.get("scope") == "Namespaced",
                    shortnames=names.get("shortNames", []),
                    categories=names.get("categories", []),
                    verbs=CRD_VERBS,
                    subresources=list(version.get("subresources") or {}),
                )
                self._printer_columns[resource] = list(
                    version.get("additionalPrinterColumns")
                    or [tables.AGE_COLUMN | {"jsonPath": ".metadata.creationTimestamp"}]
                )
        conditions = [
            {"type": kind, "status": "True", "reason": kind, "lastTransitionTime": _now()}
            for kind in ("NamesAccepted", "Established")
        ]
        return {"acceptedNames": names, "conditions": conditions, "storedVersions": []}

    async def _serve_create(self, request: kmock.Request) -> kmock.Response:
        return kmock.Response(status=201, payload=self._write_results[request])

    async def _serve_update(self, request: kmock.Request) -> Body:
        return self._write_results[request]

    async def _serve_delete(self, request: kmock.Request) -> Body:
        return self._write_results[request]

    def _failure_body(self, status: int) -> Any:
        """Injected failures answer with a Kubernetes Status, as the real server's errors."""
        message = f"injected failure ({status})"
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "code": status,
            "reason": "InternalError" if status >= 500 else "BadRequest",
            "message": message,
        }

    async def end_watches(self) -> None:
        """End every open watch stream, as an API server does when it shuts down.

        Else the HTTP server waits for them (a minute) before it stops.
        """
        async with self._lock:
            for bus in list(self._buses.values()):
                await bus.put(_END_OF_WATCH)

    # --- reads ----------------------------------------------------------------------

    async def _serve_version(self, request: kmock.Request) -> Body:
        listing = cast(Body, await super()._serve_version(request))
        assert request.resource is not None
        # kmock says `/v1` for the core group; kubectl then finds no core kind at all.
        listing["groupVersion"] = _group_version(request.resource)
        for entry in listing["resources"]:
            if "/" in entry["name"]:
                # kmock copies the parent's short names and categories to its subresources:
                # kubectl then expands a category to `x/status` and fails to list it.
                entry.update(shortNames=[], categories=[], singularName="")
                entry["verbs"] = ["get", "patch", "update"]
                if entry["name"].endswith("/scale"):  # `kubectl scale` reads the Scale's kind
                    entry.update(kind="Scale", group="autoscaling", version="v1")
        return listing

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        resource = self._served_resource(request)
        async with self._lock:
            key: Any = (resource, request.namespace, request.name)
            body = None
            if key in self.objects and not self.objects[key].deleted:
                body = self.objects[key].raw
            version = str(self._resource_version)
        if body is None:
            raise _not_found(request)
        if request.subresource == "scale":
            if not self._has_subresource(resource, "scale"):
                raise _error(404, "NotFound", "the resource has no scale subresource")
            return _scale_of(body)
        if tables.wants_table(request):
            return self._table(request, resource, [body], version)
        return body

    def _table(
        self, request: kmock.Request, resource: kmock.resource, items: list[Body], version: str
    ) -> Body:
        include = request.params.get("includeObject", "Metadata")
        columns = self._printer_columns.get(resource)
        return tables.table(items, columns, include=include, version=version)

    async def _serve_list(self, request: kmock.Request) -> Body:
        resource = self._served_resource(request)
        selects = _selector(request)
        async with self._lock:  # the items and the version of one moment
            items = self._stored_objects(resource)
            version = str(self._resource_version)
        if tables.wants_table(request):
            return self._table(
                request, resource, sorted(filter(selects, items), key=_namespace_and_name), version
            )
        kind = self.resources[resource].kind or str(resource.plural)
        return {
            "apiVersion": _group_version(resource),
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": version},
            "items": sorted(filter(selects, items), key=_namespace_and_name),
        }

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        resource = self._served_resource(request)  # errors answer before the stream starts
        selects = _selector(request)
        yield b""  # send the headers now: a watch may stay silent for a long time
        since = request.params.get("resourceVersion", "")
        since_version = int(since) if since.isdigit() else 0
        # A "watch-list" (client-go's informers, e.g. kubectl wait) wants all objects, then a
        # bookmark that ends the initial events.
        watch_list = request.params.get("sendInitialEvents") == "true"
        timeout = request.params.get("timeoutSeconds")
        bus = self._buses[resource]

        def as_table(event: Event) -> Event:
            """`kubectl get -w` watches Tables: one row per event."""
            if not tables.wants_table(request):
                return event
            body = event["object"]
            row = self._table(request, resource, [body], body["metadata"]["resourceVersion"])
            return {"type": event["type"], "object": row}

        async with self._lock:  # no write can slip between the replay and the stream
            position = await bus.mark()
            replay = self._stored_objects(resource)
            version = str(self._resource_version)
            self.open_watches += 1
        try:
            async with asyncio.timeout(float(timeout) if timeout else None):
                for body in sorted(replay, key=_namespace_and_name):
                    newer = int(body["metadata"]["resourceVersion"]) > since_version
                    if (watch_list or newer) and selects(body):
                        yield as_table({"type": "ADDED", "object": body})
                if watch_list:
                    yield self._end_of_initial_events(resource, version)
                async for event in bus.stream(since=position):
                    if event is _END_OF_WATCH:
                        return
                    if selects(event["object"]):
                        yield as_table(event)
        except TimeoutError:
            return  # the server ends a watch after its timeoutSeconds, as the real one does
        finally:
            self.open_watches -= 1
            await bus.unmark(position)

    def _end_of_initial_events(self, resource: kmock.resource, version: str) -> Event:
        marker = {"k8s.io/initial-events-end": "true"}
        return {
            "type": "BOOKMARK",
            "object": {
                "apiVersion": _group_version(resource),
                "kind": self.resources[resource].kind,
                "metadata": {"resourceVersion": version, "annotations": marker},
            },
        }


# --- patches ------------------------------------------------------------------------


def _content_type(request: kmock.Request) -> str:
    return request_header(request, "Content-Type").split(";")[0].strip().lower()


def _patch_document(request: kmock.Request) -> Any:
    if request.data is None and _content_type(request) == APPLY_PATCH:
        return yaml.safe_load(request.text)  # server-side apply may send YAML
    return request.data


def _apply_patch(current: Body, patch: Any, content_type: str) -> Body:
    if content_type == JSON_PATCH:
        try:
            return jsonpatch.apply_patch(current, patch)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            # Kopf retries its finalizer patch on 422, when its resourceVersion test fails.
            raise _error(422, "Invalid", f"the JSON patch cannot be applied: {exc}") from exc
    if content_type in MERGE_PATCHES:
        if not isinstance(patch, dict):
            raise _error(400, "BadRequest", "a merge patch must be a JSON object")
        return _merge_patch(current, patch)
    raise _error(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _scale_of(body: Body) -> Body:
    """The autoscaling/v1 Scale of an object with spec.replicas (a Deployment)."""
    meta = body.get("metadata", {})
    kept = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
    match_labels = (body.get("spec", {}).get("selector") or {}).get("matchLabels") or {}
    return {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {key: meta[key] for key in kept if key in meta},
        "spec": {"replicas": body.get("spec", {}).get("replicas", 1)},
        "status": {
            "replicas": body.get("status", {}).get("replicas", 0),
            "selector": ",".join(f"{key}={value}" for key, value in sorted(match_labels.items())),
        },
    }


def _namespace_and_name(body: Body) -> tuple[str, str]:
    return body["metadata"].get("namespace") or "", body["metadata"]["name"]


def _without_metadata_and_status(body: Body) -> Body:
    return {key: value for key, value in body.items() if key not in ("metadata", "status")}


# --- selectors ----------------------------------------------------------------------

# One equality-based requirement: `key`, `!key`, `key=value`, `key==value`, `key!=value`.
_REQUIREMENT = re.compile(r"(?P<absent>!)?(?P<key>[\w./-]+)(?:(?P<op>==|=|!=)(?P<value>[\w.-]*))?")
# The fields each kind can be selected by (besides metadata.name and metadata.namespace),
# with the path of the value where it is not the field itself, as the API server has them.
_SELECTABLE_FIELDS: dict[str, dict[str, str]] = {
    "events": {
        **{
            f"involvedObject.{field}": f"involvedObject.{field}"
            for field in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion")
        },
        "involvedObject.fieldPath": "involvedObject.fieldPath",
        "reason": "reason",
        "reportingComponent": "reportingComponent",
        "source": "source.component",
        "type": "type",
    },
}
_METADATA_FIELDS = {"metadata.name": "metadata.name", "metadata.namespace": "metadata.namespace"}


def _selector(request: kmock.Request) -> Callable[[Body], bool]:
    """Whether an object is in the request's namespace (or name) and matches its selectors."""
    labels = _requirements(request.params.get("labelSelector", ""))
    fields = _requirements(request.params.get("fieldSelector", ""))
    plural = str(request.resource.plural) if request.resource is not None else ""
    selectable = _METADATA_FIELDS | _SELECTABLE_FIELDS.get(plural, {})
    for key, _, _ in fields:
        if key not in selectable:
            raise _error(400, "BadRequest", f"field label not supported: {key}")

    def selects(body: Body) -> bool:
        meta = body.get("metadata", {})
        fields_of_object = {field: _dotted(body, path) for field, path in selectable.items()}
        fields_of_object = {
            field: value for field, value in fields_of_object.items() if value is not None
        }
        return (
            request.namespace in (None, meta.get("namespace"))
            and request.name in (None, meta.get("name"))
            and _satisfied(labels, meta.get("labels") or {})
            and _satisfied(fields, fields_of_object)
        )

    return selects


def _dotted(body: Any, path: str) -> Any:
    for part in path.split("."):
        body = body.get(part) if isinstance(body, dict) else None
    return body


def _requirements(selector: str) -> list[tuple[str, str, str | None]]:
    requirements = []
    for term in filter(None, (part.strip() for part in selector.split(","))):
        match = _REQUIREMENT.fullmatch(term)
        if match is None:  # set-based (`in`, `notin`) or malformed
            raise _error(400, "BadRequest", f"the emulator cannot parse selector {term!r}")
        if match["op"]:
            requirements.append(
                (match["key"], "!=" if match["op"] == "!=" else "=", match["value"])
            )
        else:
            requirements.append((match["key"], "absent" if match["absent"] else "present", None))
    return requirements


def _satisfied(requirements: list[tuple[str, str, str | None]], values: dict[str, Any]) -> bool:
    def holds(key: str, op: str, value: str | None) -> bool:
        if op == "present":
            return key in values
        if op == "absent":
            return key not in values
        return (values.get(key) == value) == (op == "=")

    return all(holds(*requirement) for requirement in requirements)


# --- small helpers ------------------------------------------------------------------


def _error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    details = details or {"causes": [{"message": message}]}  # kmock sends a traceback if empty
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=details)


def _not_found(request: kmock.Request) -> kmock.KubernetesError:
    message = f'{_kind_name(request)} "{request.name}" not found'
    return _error(404, "NotFound", message, name=request.name, kind=_kind_name(request))


def _kind_name(request: kmock.Request) -> str:
    """`deployments.apps`, `recommendersystems.recsys.dev`, `configmaps`: as kubectl prints it."""
    assert request.resource is not None
    group = request.resource.group
    return f"{request.resource.plural}.{group}" if group else str(request.resource.plural)


def _group_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def _generated_name(prefix: str | None) -> str | None:
    if not prefix:
        return None
    alphabet = string.ascii_lowercase + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(5))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
