"""The local system's desired state: the RecommenderSystem manifest in the run folder.

`recsys up` writes it; `recsys rollout start|pause|resume` edits it the way
`kubectl patch` would edit the resource; the supervisor re-reads it when it changes.
Local endpoints replace the cluster ones here, so that every renderer the operator
uses (TorchServe config, handler env, feature job env, gateway routing) runs unchanged.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from recsys_contracts.field_issues import InvalidResource
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.local.run_folder import RunFolder
from recsys_operator.manifests import (
    ManifestPathError,
    load_documents,
    parse_resource,
    validate_documents,
)


class ManifestError(ValueError):
    """The manifest cannot run locally; the message lists what is wrong, field by field."""


def load_system_manifest(paths: list[Path]) -> dict[str, Any]:
    """The one RecommenderSystem among the given documents, validated, as its YAML body.

    ScalingPolicies are validated with it (bounds are checked) but do not apply locally:
    every part runs as one process."""
    try:
        documents = load_documents(paths)
    except ManifestPathError as exc:
        raise ManifestError(f"-f {exc}") from None
    report = validate_documents(documents)
    if not report.ok:
        raise ManifestError("\n".join(line for line in report.lines() if not line.startswith("ok")))
    bodies = [
        doc.body
        for doc in documents
        if isinstance(doc.body, dict) and doc.body.get("kind") == "RecommenderSystem"
    ]
    if len(bodies) != 1:
        raise ManifestError(f"local mode runs one RecommenderSystem; the files hold {len(bodies)}")
    body: dict[str, Any] = bodies[0]
    body.setdefault("metadata", {}).setdefault("namespace", "default")
    body.pop("status", None)
    return body


def read_manifest(path: Path) -> dict[str, Any]:
    body = yaml.safe_load(path.read_text())
    if not isinstance(body, dict):
        raise ManifestError(f"{path}: expected one RecommenderSystem document")
    return body


def write_manifest(path: Path, body: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(body, sort_keys=False))
    tmp.replace(path)


def parse_system(body: dict[str, Any]) -> RecommenderSystem:
    try:
        resource = parse_resource(body)
    except InvalidResource as exc:
        raise ManifestError(str(exc)) from None
    if not isinstance(resource, RecommenderSystem):
        raise ManifestError(f"expected a RecommenderSystem, got {body.get('kind')}")
    return resource


def localize(
    body: dict[str, Any],
    *,
    pulsar_url: str,
    redis_url: str,
    redis_mode: str = "single",
    run_root: Path | None = None,
) -> RecommenderSystem:
    """The system with its broker and feature store (one node, or a cluster) on this
    machine, and (given `run_root`) retraining on the run folder's event log and model
    store, whatever URIs spec.training names for the cluster."""
    local = copy.deepcopy(body)  # the caller's body stays as it was
    spec = local["spec"]
    if run_root is not None and isinstance(spec.get("training"), dict):
        folder = RunFolder(run_root.resolve())
        spec["training"]["logUri"] = f"file://{folder.event_log}"
        spec["training"]["modelStoreUri"] = f"file://{folder.model_store}"
    spec.setdefault("events", {})["serviceUrl"] = pulsar_url
    # Locally there are no Secrets: the broker and the store run without authentication.
    spec["events"].pop("authSecretRef", None)
    spec.setdefault("features", {}).setdefault("store", {})["url"] = redis_url
    spec["features"]["store"]["mode"] = redis_mode
    spec["features"]["store"].pop("passwordSecretRef", None)
    return parse_system(local)


def plain_env(env: list[dict[str, Any]]) -> dict[str, str]:
    """A rendered container env as a process environment. Entries taken from Secrets
    (`valueFrom`) are left out: locally there are no Secrets (see `localize`)."""
    return {e["name"]: e["value"] for e in env if "value" in e}


class DesiredState:
    """system.yaml as the supervisor last read it, and the system it describes with its
    broker and store on this machine. Re-read when the file changes; a bad edit is
    refused and the last good state kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.body = read_manifest(path)
        self.mtime = path.stat().st_mtime
        self._system: RecommenderSystem | None = None

    @property
    def system(self) -> RecommenderSystem:
        assert self._system is not None, "localize() first: the endpoints are not known yet"
        return self._system

    @property
    def localized(self) -> RecommenderSystem | None:
        """The system once its local endpoints are known, else None."""
        return self._system

    def localize(
        self, *, pulsar_url: str, redis_url: str, redis_mode: str = "single"
    ) -> RecommenderSystem:
        self._system = localize(
            self.body,
            pulsar_url=pulsar_url,
            redis_url=redis_url,
            redis_mode=redis_mode,
            run_root=self.path.parent,
        )
        return self._system

    def reload(self) -> RecommenderSystem | None:
        """The new system when the file changed since the last read, else None. Raises
        ManifestError, OSError or ValueError for a change that cannot run (it is not
        read again until it changes again)."""
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return None
        if mtime == self.mtime:
            return None
        self.mtime = mtime
        body = read_manifest(self.path)
        system = localize(
            body,
            pulsar_url=self.system.spec.events.service_url,
            redis_url=self.system.spec.features.store.url,
            redis_mode=self.system.spec.features.store.mode.value,
            run_root=self.path.parent,
        )
        self.body, self._system = body, system
        return system
