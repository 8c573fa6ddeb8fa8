"""The CRDs refuse at admission what the models refuse: schema, defaults, then CEL rules.

`admission_problems` does what the API server does with a custom resource, in order:
strict field validation (unknown fields, as `kubectl apply` asks by default), the
structural schema, defaulting, then each `x-kubernetes-validations` rule evaluated
with a real CEL implementation (cel-python) at its node. Every bad case of
test_validation.py must be refused here too, so the CRDs and the models cannot drift.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from recsys_contracts.field_issues import join_path
from recsys_operator.api import cel
from recsys_operator.api.resources import RESOURCE_TYPES
from recsys_operator.crd import openapi_schema
from recsys_operator.manifests import crd_schema_issues

from .test_validation import MISTAKES, with_change

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# Mistakes no standard CEL rule can catch: quantities ("4Gi" vs "2Gi") compare by value
# only with Kubernetes' quantity() library, and a URL's host and port need its url()
# library, neither of which cel-python has. The operator (and `recsys validate`) still
# refuses them, as an InvalidSpec condition.
NOT_EXPRESSIBLE_IN_CEL = {"exceeds limit", "not a usable URL", "names no host"}

_CEL = celpy.Environment()


@functools.cache
def _program(expression: str) -> Any:
    return _CEL.program(_CEL.compile(expression))


def cel_holds(expression: str, value: Any) -> bool:
    result = _program(expression).evaluate({"self": celpy.json_to_cel(value)})
    if isinstance(result, celpy.CELEvalError):  # the API server refuses a rule that errors
        return False
    return bool(result)


def _unknown_fields(schema: dict[str, Any], value: Any, path: tuple[str | int, ...]) -> list[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, list) and "items" in schema:  # strict field validation checks items
        return [
            problem
            for index, item in enumerate(value)
            for problem in _unknown_fields(schema["items"], item, (*path, index))
        ]
    if not isinstance(value, dict):
        return []
    if "properties" in schema:
        found = [join_path(*path, key) for key in value if key not in schema["properties"]]
        for key, child in schema["properties"].items():
            if key in value:
                found += _unknown_fields(child, value[key], (*path, key))
        return found
    if isinstance(schema.get("additionalProperties"), dict):
        return [
            problem
            for key, child in value.items()
            for problem in _unknown_fields(schema["additionalProperties"], child, (*path, key))
        ]
    return []


def _defaulted(schema: dict[str, Any], value: Any) -> Any:
    """The API server's defaulting: missing properties of present objects get their default."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for key, child in schema["properties"].items():
            if key not in out and "default" in child:
                out[key] = copy.deepcopy(child["default"])
            if key in out:
                out[key] = _defaulted(child, out[key])
        return out
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {k: _defaulted(schema["additionalProperties"], v) for k, v in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [_defaulted(schema["items"], item) for item in value]
    return value


def _rule_failures(schema: dict[str, Any], value: Any, path: tuple[str, ...]) -> list[str]:
    failures = []
    for item in schema.get(cel.KEY, []):
        if not cel_holds(item["rule"], value):
            where = join_path(*path) + item.get("fieldPath", "")
            failures.append(f"{where.lstrip('.')}: {item['message']}")
    if isinstance(value, dict) and "properties" in schema:
        for key, child in schema["properties"].items():
            if value.get(key) is not None:
                failures += _rule_failures(child, value[key], (*path, key))
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, child_value in value.items():
            failures += _rule_failures(schema["additionalProperties"], child_value, (*path, key))
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            failures += _rule_failures(schema["items"], item, (*path, str(index)))
    return failures


def admission_problems(body: dict[str, Any]) -> list[str]:
    """What the API server would refuse `body` for, as `path: message` lines."""
    schema = openapi_schema(RESOURCE_TYPES[body["kind"]])
    problems = [f"{path}: unknown field" for path in _unknown_fields(schema, body, ())]
    problems += [f"{issue.path}: {issue.message}" for issue in crd_schema_issues(body)]
    if problems:
        return problems  # the API server stops before CEL on a schema failure
    return _rule_failures(schema, _defaulted(schema, body), ())


def policy(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "recsys.dev/v1alpha1",
        "kind": "ScalingPolicy",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": spec,
    }


@pytest.mark.parametrize(
    ("path", "value", "expected_path", "phrase"),
    MISTAKES,
    ids=[f"{m[0]}={m[1]!r}"[:60] for m in MISTAKES],
)
def test_every_mistake_the_models_refuse_is_refused_at_admission(
    path: str, value: Any, expected_path: str, phrase: str
) -> None:
    problems = admission_problems(with_change(path, value))
    if phrase in NOT_EXPRESSIBLE_IN_CEL:
        assert problems == [], "now caught at admission: drop it from NOT_EXPRESSIBLE_IN_CEL"
        return
    assert problems, f"{path}={value!r} passes admission"
    # Reported at the field the models name, or at the object holding it.
    assert any(expected_path.startswith(p.split(": ")[0]) for p in problems), problems


@pytest.mark.parametrize(
    "spec",
    [
        {"serving": {"minReplicas": 5, "maxReplicas": 2}},
        {"gateway": {"minReplicas": 7, "maxReplicas": 6}},
        {"engine": "hpa", "streamJobs": {"minReplicas": 0}},
        {"engine": "hpa", "serving": {"targetGpuUtilization": 80}},
        {"engine": "keda", "streamJobs": {"maxReplicas": 4, "fallbackReplicas": 9}},
    ],
)
def test_policy_mistakes_are_refused_at_admission(spec: dict[str, Any]) -> None:
    from recsys_operator.api import InvalidResource
    from recsys_operator.manifests import parse_resource

    with pytest.raises(InvalidResource):
        parse_resource(policy(spec))
    assert admission_problems(policy(spec))


def test_rules_hold_for_every_example_and_for_an_almost_empty_spec() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for body in yaml.safe_load_all(path.read_text()):
            if body and body.get("kind") in RESOURCE_TYPES:
                assert admission_problems(body) == [], path.name
    tiny = {
        "apiVersion": "recsys.dev/v1alpha1",
        "kind": "RecommenderSystem",
        "metadata": {"name": "tiny"},
        "spec": {"model": {"version": "1"}},
    }
    assert admission_problems(tiny) == []
    assert admission_problems(policy({})) == []


def test_variants_the_models_accept_pass_admission() -> None:
    accepted = [
        with_change("spec.rollout.steps", [100]),
        with_change("spec.rollout.steps", [*range(5, 100, 5), 100]),
        with_change("spec.model.index", {"type": "IVF-PQ", "ivfpq": {"nlist": 64, "nprobe": 64}}),
        with_change(
            "spec.model.index",
            {"type": "IVF-PQ", "ivfpq": {"nlist": 64, "nprobe": 64, "refineFactor": 8}},
        ),
        with_change(
            "spec.serving.resources",
            {"requests": {"nvidia.com/gpu": 2}, "limits": {"nvidia.com/gpu": 2}},
        ),
        with_change("spec.model.numItems", 50),
        with_change("spec.features.store", {"mode": "cluster", "url": "redis://rc:6379"}),
        with_change(
            "spec.features.store", {"mode": "cluster", "url": "rediss://user:pw@rc.ns:6380/0"}
        ),
    ]
    for body in accepted:
        from recsys_operator.manifests import parse_resource

        parse_resource(body)
        assert admission_problems(body) == []


def test_a_longer_rollout_than_the_bound_is_refused_by_the_schema() -> None:
    steps = [*range(1, 21), 100]
    problems = admission_problems(with_change("spec.rollout.steps", steps))
    assert any(p.startswith("spec.rollout.steps") for p in problems)


def test_every_list_in_the_crds_is_bounded() -> None:
    # The API server estimates each CEL rule's cost from maxItems/maxLength; unbounded
    # lists also let one object grow without limit.
    def arrays(node: Any, path: str) -> list[str]:
        if not isinstance(node, dict):
            return []
        found = [path] if node.get("type") == "array" and "maxItems" not in node else []
        for key in ("properties", "additionalProperties", "items"):
            child = node.get(key)
            if key == "properties" and isinstance(child, dict):
                for name, sub in child.items():
                    found += arrays(sub, f"{path}.{name}")
            elif isinstance(child, dict):
                found += arrays(child, f"{path}[]")
        return found

    for model in RESOURCE_TYPES.values():
        assert arrays(openapi_schema(model), model.kind_name) == []
