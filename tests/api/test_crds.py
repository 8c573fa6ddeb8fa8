"""The CRDs in crds/ are generated from the models, structural, and agree with them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from recsys_contracts.field_issues import join_path
from recsys_operator.api import InvalidResource
from recsys_operator.api.resources import RESOURCE_TYPES, RecommenderSystem
from recsys_operator.crd import build_crd, render_crd_files, stale_crd_files
from recsys_operator.manifests import crd_schema_issues, load_documents, parse_resource

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("folder", ["crds", "charts/recsys-operator/crds"])
def test_crd_folders_are_up_to_date(folder: str) -> None:
    stale = stale_crd_files(ROOT / folder)
    assert not stale, f"run `recsys crds`: {stale} in {folder}/ differ from the models"


def test_generation_is_deterministic() -> None:
    assert render_crd_files() == render_crd_files()


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    nodes = [(path, schema)]
    for name, child in schema.get("properties", {}).items():
        nodes += walk(child, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        nodes += walk(schema["additionalProperties"], f"{path}.*")
    if "items" in schema:
        nodes += walk(schema["items"], f"{path}[]")
    return nodes


@pytest.mark.parametrize("kind", sorted(RESOURCE_TYPES))
def test_schema_is_structural_and_documented(kind: str) -> None:
    crd = build_crd(RESOURCE_TYPES[kind])
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        assert "$ref" not in node and "$defs" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not ("additionalProperties" in node and "properties" in node), path
        assert node.get("additionalProperties") is not False, path
        documented = path.startswith((".spec", ".status")) and not path.endswith((".*", "[]"))
        if documented:
            assert node.get("description"), f"{path} has no description"
        if isinstance(node.get("exclusiveMinimum"), bool):
            assert "minimum" in node, path
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["scope"] == "Namespaced"


def test_recommender_system_crd_names_and_columns() -> None:
    crd = build_crd(RecommenderSystem)
    assert crd["metadata"]["name"] == "recommendersystems.recsys.dev"
    assert crd["spec"]["names"]["shortNames"] == ["recsys"]
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns[:4] == ["Ready", "Stable", "Canary", "Weight"] and columns[-1] == "Age"


def example_resources() -> list[dict[str, Any]]:
    return [
        d.body
        for d in load_documents([ROOT / "examples"])
        if isinstance(d.body, dict) and str(d.body.get("apiVersion", "")).startswith("recsys.dev/")
    ]


@pytest.mark.parametrize(
    "body", example_resources(), ids=lambda b: f"{b['kind']}/{b['metadata']['name']}"
)
def test_examples_pass_the_generated_crd_schema(body: dict[str, Any]) -> None:
    assert crd_schema_issues(body) == []


def test_model_output_passes_the_crd_schema_including_status() -> None:
    rs = RecommenderSystem.model_validate(
        {
            "metadata": {"name": "x"},
            "spec": {"model": {"version": "1"}},
            "status": {
                "observedGeneration": 3,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "AllReady",
                        "observedGeneration": 3,
                    }
                ],
                "stableVersion": "1",
                "canary": {
                    "version": "2",
                    "weight": 25,
                    "step": 1,
                    "lastAnalysis": {
                        "time": "2026-01-01T00:00:00Z",
                        "decision": "Pass",
                        "pValue": 0.2,
                    },
                },
            },
        }
    )
    assert crd_schema_issues(rs.to_wire()) == []


# Mistakes the schema alone can express: the API server and the operator must both reject them.
SCHEMA_MISTAKES = [
    (("spec", "events", "topics", "interactions", "partitions"), 0),
    (("spec", "serving", "replicas"), -1),
    (("spec", "serving", "workers"), "two"),
    (("spec", "model", "index", "type"), "LSH"),
    (("spec", "model", "version"), "bad version"),
    (("spec", "rollout", "analysis", "confidence"), 1.0),
    (("spec", "rollout", "interval"), "soon"),
    (("spec", "features", "store", "url"), "http://not-redis"),
    (("spec", "serving", "resources", "limits", "memory"), "lots"),
]


@pytest.mark.parametrize(
    ("path", "value"), SCHEMA_MISTAKES, ids=[".".join(m[0]) for m in SCHEMA_MISTAKES]
)
def test_schema_and_models_reject_the_same_mistakes(path: tuple[str, ...], value: Any) -> None:

    doc = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text()))
    node = doc
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    schema_paths = {i.path for i in crd_schema_issues(doc)}
    assert join_path(*path) in schema_paths
    with pytest.raises(InvalidResource) as info:
        parse_resource(doc)
    assert join_path(*path) in {i.path for i in info.value.issues}


def test_crd_yaml_loads_as_one_document_each() -> None:
    for name, text in render_crd_files().items():
        docs = list(yaml.safe_load_all(text))
        assert len(docs) == 1 and docs[0]["kind"] == "CustomResourceDefinition", name
