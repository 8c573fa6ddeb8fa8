"""CustomResourceDefinitions generated from the pydantic models.

Pydantic emits JSON Schema (draft 2020-12); Kubernetes wants a *structural*
OpenAPI v3.0 schema: no `$ref`, every node typed, `nullable` instead of a null
branch, boolean `exclusiveMinimum`, no `additionalProperties: false`. This
module does that translation and nothing else, so the models stay the one
source of truth.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from recsys_contracts.api_base import DNS_LABEL_PATTERN
from recsys_operator.api import cel
from recsys_operator.api.base import GROUP, VERSION
from recsys_operator.api.resources import (
    MAX_NAME_LENGTH,
    RESOURCE_TYPES,
    CustomResource,
    RecommenderSystem,
)

# JSON Schema keywords a structural schema may carry (others are dropped).
_ALLOWED_KEYS = {
    "type",
    "description",
    "properties",
    "additionalProperties",
    "items",
    "required",
    "enum",
    "default",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "uniqueItems",
    "nullable",
    "anyOf",
    "format",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "multipleOf",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-validations",
}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every `$ref`, keeping the referring field's description over the model's."""
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        overrides = {k: v for k, v in node.items() if k != "$ref"}
        target.update(overrides)
        return _resolve(target, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one resolved JSON Schema node (recursively) into structural OpenAPI v3."""
    node = dict(node)
    if node.get("x-kubernetes-int-or-string"):
        return _ordered({k: v for k, v in node.items() if k in _ALLOWED_KEYS})

    # Optional[X]: pydantic says anyOf [X, null]; Kubernetes says X + nullable.
    branches = node.get("anyOf")
    if branches is not None:
        non_null = [b for b in branches if b.get("type") != "null"]
        if len(non_null) == 1 and len(non_null) < len(branches):
            del node["anyOf"]
            merged = {
                **non_null[0],
                **{k: v for k, v in node.items() if k != "default" or v is not None},
            }
            merged["nullable"] = True
            if merged.get("default", "x") is None:
                del merged["default"]
            node = merged
        else:
            raise ValueError(f"union types cannot be expressed in a structural schema: {node}")

    # Draft 2020 exclusive bounds are numbers; OpenAPI v3.0 uses booleans beside minimum/maximum.
    for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(node.get(flag), int | float) and not isinstance(node.get(flag), bool):
            node[bound] = node.pop(flag)
            node[flag] = True

    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    if node.get("additionalProperties") is True:  # a free-form object (dict[str, Any])
        del node["additionalProperties"]
        node["x-kubernetes-preserve-unknown-fields"] = True
    if "properties" in node:
        node["type"] = "object"
        node["properties"] = {k: _structural(v) for k, v in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        node["type"] = "object"
        node["additionalProperties"] = _structural(node["additionalProperties"])
    if "items" in node:
        node["items"] = _structural(node["items"])
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    if (
        node.get("type") == "object"
        and "properties" not in node
        and "additionalProperties" not in node
    ):
        node["x-kubernetes-preserve-unknown-fields"] = True
    if "type" not in node:
        raise ValueError(f"schema node without a type cannot be structural: {node}")
    return _ordered({k: v for k, v in node.items() if k in _ALLOWED_KEYS})


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Type and description first, nested schemas last: the CRD reads top-down."""
    head = [k for k in ("type", "description") if k in node]
    tail = [
        k for k in ("required", "properties", "additionalProperties", "items", cel.KEY) if k in node
    ]
    middle = sorted(k for k in node if k not in head and k not in tail)
    return {k: node[k] for k in head + middle + tail}


def openapi_schema(model: type[CustomResource]) -> dict[str, Any]:
    """The structural openAPIV3Schema of one custom resource."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    resolved = _resolve(raw, defs)
    props = resolved["properties"]
    schema: dict[str, Any] = {
        "type": "object",
        "description": resolved.get("description", ""),
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion of this object (recsys.dev/v1alpha1).",
            },
            "kind": {"type": "string", "description": f"Kind of this object ({model.kind_name})."},
            "metadata": {"type": "object"},
            "spec": _structural(props["spec"]),
            "status": _structural(props["status"]),
        },
    }
    if "spec" in resolved.get("required", []):
        schema["required"] = ["spec"]
    # ObjectMeta is the API server's own: its name rules are checked at the root.
    schema[cel.KEY] = [
        cel.rule(
            f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            f"metadata.name must be at most {MAX_NAME_LENGTH} characters (child names add suffixes)",
            ".metadata.name",
        ),
        cel.rule(
            f"self.metadata.name.matches('{DNS_LABEL_PATTERN}')",
            "metadata.name must be a DNS label (lower case letters, digits, '-')",
            ".metadata.name",
        ),
    ]
    return schema


def _printer_columns(model: type[CustomResource]) -> list[dict[str, Any]]:
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    ready = {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    }
    if model is RecommenderSystem:
        return [
            ready,
            {
                "name": "Stable",
                "type": "string",
                "jsonPath": ".status.stableVersion",
                "description": "Model version serving stable traffic",
            },
            {
                "name": "Canary",
                "type": "string",
                "jsonPath": ".status.canary.version",
                "description": "Model version being rolled out",
            },
            {
                "name": "Weight",
                "type": "integer",
                "jsonPath": ".status.canary.weight",
                "description": "Percent of traffic on the canary",
            },
            {
                "name": "Phase",
                "type": "string",
                "priority": 1,
                "jsonPath": ".status.canary.phase",
                "description": "Where the rollout stands: PreRollout, Shadow, Progressing, AwaitingPromotion, Promoting",
            },
            {
                "name": "Reason",
                "type": "string",
                "priority": 1,
                "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
            },
            {
                "name": "Training",
                "type": "string",
                "priority": 1,
                "jsonPath": ".status.training.result",
                "description": "The last training run: Passed, GatedOut or Failed",
            },
            {
                "name": "Candidate",
                "type": "string",
                "priority": 1,
                "jsonPath": ".status.training.candidateVersion",
                "description": "The last training run's candidate version",
            },
            age,
        ]
    return [
        ready,
        {"name": "Engine", "type": "string", "jsonPath": ".spec.engine"},
        age,
    ]


# kubectl expands a category before it looks up short names, so a category must never be
# a word that also names one resource: `kubectl get recsys NAME` would then mean "every
# kind in the category, one named NAME", which kubectl refuses.
CATEGORY = "recsys-all"


def _names(model: type[CustomResource]) -> dict[str, Any]:
    names = {
        "kind": model.kind_name,
        "listKind": f"{model.kind_name}List",
        "plural": model.plural,
        "singular": model.kind_name.lower(),
        "shortNames": list(model.short_names),
        "categories": [CATEGORY],
    }
    for other in RESOURCE_TYPES.values():
        words = {other.plural, other.kind_name.lower(), *other.short_names}
        if CATEGORY in words:
            raise ValueError(f"category {CATEGORY!r} collides with a name of {other.kind_name}")
    return names


def build_crd(model: type[CustomResource]) -> dict[str, Any]:
    """The whole apiextensions.k8s.io/v1 CRD object for one resource type."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{model.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "recsys-operator"},
        },
        "spec": {
            "group": GROUP,
            "names": _names(model),
            "scope": "Namespaced" if model.namespaced else "Cluster",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _printer_columns(model),
                    "schema": {"openAPIV3Schema": openapi_schema(model)},
                }
            ],
        },
    }


def crd_file_name(model: type[CustomResource]) -> str:
    return f"{GROUP}_{model.plural}.yaml"


HEADER = "# Generated by `recsys crds` from the pydantic models in operator/api/. Do not edit.\n"


def render_crd_files() -> dict[str, str]:
    """File name -> YAML text of every CRD, exactly as `recsys crds` writes them."""
    return {
        crd_file_name(model): HEADER + yaml.safe_dump(build_crd(model), sort_keys=False, width=120)
        for model in RESOURCE_TYPES.values()
    }


def write_crd_files(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_crd_files().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def stale_crd_files(directory: Path) -> list[str]:
    """Names of CRD files in `directory` that differ from what the models generate."""
    return [
        name
        for name, text in render_crd_files().items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]
