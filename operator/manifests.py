"""Reading manifests and validating them as the cluster and the operator would.

Two checks run on every recsys.dev document:
1. the generated CRD schema (what the API server enforces on `kubectl apply`);
2. the pydantic models (what the operator enforces, including cross-field rules).
Then each RecommenderSystem that references a ScalingPolicy given alongside it
is checked against that policy (tighten, never exceed).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from pydantic import ValidationError

from recsys_contracts.field_issues import (
    FieldIssue,
    InvalidResource,
    issues_from_validation_error,
    join_path,
)
from recsys_operator.api.base import API_VERSION, GROUP
from recsys_operator.api.effective_scaling import resolve_scaling
from recsys_operator.api.resources import (
    RESOURCE_TYPES,
    CustomResource,
    RecommenderSystem,
    ScalingPolicy,
)
from recsys_operator.crd import openapi_schema


@dataclass(frozen=True)
class Document:
    """One YAML document and where it came from."""

    source: str
    index: int
    body: Any

    @property
    def where(self) -> str:
        return f"{self.source}#{self.index}" if self.index else self.source

    @property
    def title(self) -> str:
        if not isinstance(self.body, dict):
            return self.where
        name = (self.body.get("metadata") or {}).get("name", "?")
        return f"{self.where}: {self.body.get('kind', '?')}/{name}"


class ManifestPathError(ValueError):
    """A manifest path that gives nothing to read; the message names it and says why."""


def _yaml_files(path: Path) -> list[Path]:
    if not path.exists():
        raise ManifestPathError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml"))
        if not files:
            # Checking nothing and saying nothing would read as "all valid".
            raise ManifestPathError(f"{path}: a folder with no .yaml or .yml file")
        return files
    return [path]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ManifestPathError(f"{path}: not a text file (not UTF-8)") from None
    except OSError as exc:
        raise ManifestPathError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def load_documents(paths: Iterable[Path]) -> list[Document]:
    """Every non-empty YAML document in the given files and folders ('-' is stdin).

    Raises ManifestPathError for a path that does not exist, cannot be read, or is a
    folder without YAML files."""
    documents = []
    for path in paths:
        if str(path) == "-":
            sources = [("<stdin>", sys.stdin.read())]
        else:
            sources = [(str(p), _read_text(p)) for p in _yaml_files(path)]
        for source, text in sources:
            try:
                bodies = list(yaml.safe_load_all(text))
            except yaml.YAMLError as exc:
                documents.append(Document(source, 0, exc))
                continue
            documents.extend(Document(source, i, b) for i, b in enumerate(bodies) if b is not None)
    return documents


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line, with the line and column where the parser gave up (PyYAML's own text
    spreads over lines and names "<unicode string>")."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or problem is None:
        return f"not valid YAML: {error}"
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    return f"not valid YAML at {where}: {problem}" + (f" ({context})" if context else "")


def _nullable_to_draft4(node: Any) -> Any:
    """OpenAPI's `nullable: true` spelled as JSON Schema draft 4 (which has no `nullable`)."""
    if isinstance(node, list):
        return [_nullable_to_draft4(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable_to_draft4(v) for k, v in node.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The CRD's OpenAPI schema of `kind` (built from the models once: tens of ms)."""
    return openapi_schema(RESOURCE_TYPES[kind])


@cache
def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    """A validator for the CRD schema of `kind`. OpenAPI v3.0 bounds are draft-4 style."""
    return jsonschema.Draft4Validator(_nullable_to_draft4(crd_schema(kind)))


def crd_schema_issues(body: dict[str, Any]) -> list[FieldIssue]:
    """Problems the API server's schema validation would report for `body`."""
    validator = crd_validator(body["kind"])
    return [
        FieldIssue(join_path(*err.absolute_path), err.message)
        for err in sorted(
            validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path))
        )
    ]


def parse_resource(body: Any, default_namespace: str = "default") -> CustomResource:
    """Validate one document as a recsys.dev resource; raises InvalidResource naming each field."""
    if not isinstance(body, dict):
        raise InvalidResource(
            "document", [FieldIssue("", "expected a mapping (a Kubernetes object)")]
        )
    kind = body.get("kind")
    if kind not in RESOURCE_TYPES:
        raise InvalidResource(
            "document",
            [
                FieldIssue(
                    "kind", f"unknown kind {kind!r}; expected one of {sorted(RESOURCE_TYPES)}"
                )
            ],
        )
    model = RESOURCE_TYPES[kind]
    schema_issues = crd_schema_issues(body)
    try:
        resource = model.model_validate(body)
    except ValidationError as exc:
        issues = _name_unknown_fields(exc, issues_from_validation_error(exc), kind)
        seen = {issue.path for issue in issues}
        # Schema findings the models did not already report (there should be none: a test checks).
        issues += [i for i in schema_issues if i.path not in seen]
        raise InvalidResource(
            f"{kind}/{(body.get('metadata') or {}).get('name', '?')}", issues
        ) from None
    if schema_issues:
        raise InvalidResource(f"{kind}/{resource.metadata.name}", schema_issues)
    if resource.metadata.namespace is None:
        resource.metadata.namespace = default_namespace
    return resource


def _name_unknown_fields(
    exc: ValidationError, issues: list[FieldIssue], kind: str
) -> list[FieldIssue]:
    """Pydantic's "Extra inputs are not permitted" for a mistyped field, with the field
    the user most likely meant (or the ones allowed there), from the CRD schema."""
    hints = {}
    for error in exc.errors(include_url=False):
        if error["type"] != "extra_forbidden":
            continue
        *parent, unknown = error["loc"]
        allowed = _property_names(crd_schema(kind), parent)
        if not allowed:
            continue
        close = difflib.get_close_matches(str(unknown), allowed, n=1, cutoff=0.6)
        hints[join_path(*error["loc"])] = (
            f"unknown field; did you mean {close[0]!r}?"
            if close
            else f"unknown field; expected one of {', '.join(allowed)}"
        )
    return [FieldIssue(i.path, hints[i.path]) if i.path in hints else i for i in issues]


def _property_names(schema: dict[str, Any], loc: list[int | str]) -> list[str]:
    """The fields the schema allows at `loc` (a pydantic error location); [] if unknown."""
    for part in loc:
        if isinstance(part, int):
            schema = schema.get("items") or {}
        else:
            schema = (
                (schema.get("properties") or {}).get(part)
                or schema.get("additionalProperties")
                or {}
            )
        if not isinstance(schema, dict):
            return []
    return list(schema.get("properties") or {})


@dataclass
class ValidationReport:
    """The outcome of validating a set of documents together."""

    ok_lines: list[str] = field(default_factory=list)
    errors: list[tuple[str, list[FieldIssue]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    systems: list[RecommenderSystem] = field(default_factory=list)
    policies: dict[tuple[str, str], ScalingPolicy] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def policy_for(self, system: RecommenderSystem) -> ScalingPolicy | None:
        ref = system.spec.scaling_policy_ref
        if ref is None:
            return None
        return self.policies.get((system.metadata.namespace or "default", ref.name))

    def lines(self) -> list[str]:
        out = [f"ok    {line}" for line in self.ok_lines]
        for title, issues in self.errors:
            out.append(f"error {title}")
            out.extend(f"      {issue}" for issue in issues)
        out.extend(f"note  {note}" for note in self.notes)
        return out


def validate_documents(
    documents: list[Document], default_namespace: str = "default", *, for_cluster: bool = False
) -> ValidationReport:
    """Validate documents together: each alone, then each system against its policy.

    `for_cluster=True` also runs what the operator checks only when it renders (an
    archive a cluster can fetch, a policy the cluster can run), so that `recsys
    validate` refuses whatever the operator would refuse; local mode runs without it.
    """
    report = ValidationReport()
    invalid_policies: set[tuple[str, str]] = set()
    parsed: list[tuple[Document, CustomResource]] = []
    for doc in documents:
        if isinstance(doc.body, yaml.YAMLError):
            report.errors.append((doc.where, [FieldIssue("", _yaml_problem(doc.body))]))
            continue
        api_version = str(doc.body.get("apiVersion") or "") if isinstance(doc.body, dict) else ""
        if isinstance(doc.body, dict) and not api_version.startswith(f"{GROUP}/"):
            ours = doc.body.get("kind") in RESOURCE_TYPES
            if ours and "/" not in api_version:
                # No group at all: kubectl would refuse it too; not someone else's resource.
                issue = FieldIssue("apiVersion", f"expected {API_VERSION}, got {api_version!r}")
                report.errors.append((doc.title, [issue]))
                continue
            hint = f" (this project's is apiVersion {API_VERSION})" if ours else ""
            report.notes.append(f"{doc.title}: not a {GROUP} resource, skipped{hint}")
            continue
        try:
            parsed.append((doc, parse_resource(doc.body, default_namespace)))
        except InvalidResource as exc:
            report.errors.append((doc.title, exc.issues))
            if isinstance(doc.body, dict) and doc.body.get("kind") == "ScalingPolicy":
                meta = doc.body.get("metadata") or {}
                namespace = meta.get("namespace") or default_namespace
                invalid_policies.add((namespace, str(meta.get("name", ""))))

    for _, resource in parsed:
        if isinstance(resource, ScalingPolicy):
            report.policies[
                (resource.metadata.namespace or default_namespace, resource.metadata.name)
            ] = resource
    for doc, resource in parsed:
        if isinstance(resource, RecommenderSystem):
            ref = resource.spec.scaling_policy_ref
            policy = report.policy_for(resource)
            if ref is not None and policy is not None:
                try:
                    resolve_scaling(resource.spec, policy.spec, policy.metadata.name)
                except InvalidResource as exc:
                    report.errors.append((doc.title, exc.issues))
                    continue
            elif ref is not None and (
                (resource.metadata.namespace or default_namespace, ref.name) in invalid_policies
            ):
                issue = FieldIssue(
                    "spec.scalingPolicyRef.name",
                    f'ScalingPolicy "{ref.name}" is invalid (its problems are listed above)',
                )
                report.errors.append((doc.title, [issue]))
                continue
            elif ref is not None:
                report.notes.append(
                    f"{doc.title}: ScalingPolicy {ref.name!r} not among the given files; "
                    "the operator checks it at reconcile"
                )
            if for_cluster:
                problems = _render_problems(resource, policy)
                if problems:
                    report.errors.append((doc.title, problems))
                    continue
            report.systems.append(resource)
        report.ok_lines.append(doc.title)
    return report


def _render_problems(system: RecommenderSystem, policy: ScalingPolicy | None) -> list[FieldIssue]:
    """What rendering the system's children would refuse, as the operator does at reconcile."""
    from recsys_operator.render import render_system  # render imports this module's models

    if policy is None and system.spec.scaling_policy_ref is not None:
        # The policy is not among the files: check everything else without it.
        system = system.model_copy(
            update={"spec": system.spec.model_copy(update={"scaling_policy_ref": None})}
        )
    try:
        render_system(system, policy)
    except InvalidResource as exc:
        return exc.issues
    return []


class _BlockStyleDumper(yaml.SafeDumper):
    """Multi-line strings (config files inside ConfigMaps) as literal `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStyleDumper.add_representer(str, _represent_str)


def dump_yaml_documents(objects: list[dict[str, Any]]) -> str:
    """Objects as a multi-document YAML stream, readable the way `kubectl get -o yaml` is."""
    return yaml.dump_all(objects, Dumper=_BlockStyleDumper, sort_keys=False, width=120)
