"""The API models accept the examples and reject mistakes with the exact field path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from recsys_contracts.api_base import parse_duration, quantity_value
from recsys_operator.api import InvalidResource, resolve_scaling
from recsys_operator.api.resources import RecommenderSystem, ScalingPolicy
from recsys_operator.manifests import (
    Document,
    load_documents,
    parse_resource,
    validate_documents,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def quickstart() -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())


def default_policy() -> ScalingPolicy:
    docs = list(yaml.safe_load_all((EXAMPLES / "scaling-policy.yaml").read_text()))
    return ScalingPolicy.model_validate(docs[0])


def with_change(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of `base` (the quickstart) with the dotted `path` set to `value`."""
    doc = copy.deepcopy(base or quickstart())
    node = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return doc


def issues_of(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidResource) as info:
        parse_resource(doc)
    return {issue.path: issue.message for issue in info.value.issues}


def test_every_example_is_valid() -> None:
    report = validate_documents(load_documents([EXAMPLES]))
    assert report.ok, report.lines()
    kinds = sorted(line.split(": ")[-1].split("/")[0] for line in report.ok_lines)
    assert kinds.count("RecommenderSystem") >= 2 and kinds.count("ScalingPolicy") >= 2


def test_defaults_fill_an_almost_empty_spec() -> None:
    rs = RecommenderSystem.model_validate(
        {"metadata": {"name": "tiny"}, "spec": {"model": {"version": "1"}}}
    )
    assert rs.spec.rollout.steps == [10, 25, 50, 100]
    assert rs.spec.events.topics.dead_letter.partitions == 1
    assert rs.spec.serving.resources.gpus == 0
    assert rs.spec.model.index.type == "HNSW"
    wire = rs.to_wire()
    assert wire["spec"]["serving"]["batching"] == {"maxBatchSize": 32, "maxBatchDelayMs": 5}


# Each case: a single mistake, the field path the message must name, and a phrase of the reason.
MISTAKES = [
    (
        "spec.events.adminUrl",
        "http://pulsar-broker.pulsar:99999",
        "spec.events.adminUrl",
        "not a usable URL",
    ),
    ("spec.events.adminUrl", "http://:8080", "spec.events.adminUrl", "names no host"),
    ("spec.rollout.steps", [10, 50, 25, 100], "spec.rollout.steps", "strictly increasing"),
    ("spec.rollout.steps", [10, 50], "spec.rollout.steps", "must be 100"),
    ("spec.rollout.steps", [0, 100], "spec.rollout.steps", "1..100"),
    (
        "spec.events.topics.interactions.partitions",
        0,
        "spec.events.topics.interactions.partitions",
        "greater than or equal to 1",
    ),
    (
        "spec.serving.resources",
        {"limits": {"nvidia.com/gpu": -1}},
        'spec.serving.resources.limits["nvidia.com/gpu"]',
        "negative",
    ),
    (
        "spec.serving.resources",
        {"limits": {"nvidia.com/gpu": "500m"}},
        "spec.serving.resources.limits",
        "whole number",
    ),
    (
        "spec.serving.resources",
        {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 2}},
        'spec.serving.resources.limits["nvidia.com/gpu"]',
        "must equal",
    ),
    (
        "spec.serving.resources",
        {"requests": {"memory": "4Gi"}, "limits": {"memory": "2Gi"}},
        "spec.serving.resources.requests.memory",
        "exceeds limit",
    ),
    ("spec.model.numItems", 10, "spec.model.topK", "exceeds the catalogue size"),
    (
        "spec.model.index",
        {"type": "IVF-PQ", "ivfpq": {"m": 7}},
        "spec.model.index.ivfpq.m",
        "must divide embeddingDim",
    ),
    (
        "spec.model.index",
        {"type": "IVF-PQ", "ivfpq": {"nlist": 16, "nprobe": 32}},
        "spec.model.index.ivfpq.nprobe",
        "exceeds nlist",
    ),
    (
        "spec.model.index",
        {"type": "IVF-PQ", "ivfpq": {"nlist": 64, "refineFactor": 256}},
        "spec.model.index.ivfpq.refineFactor",
        "exceeds the catalogue size",
    ),
    (
        "spec.model.index",
        {"type": "HNSW", "hnsw": {"efSearch": 10}},
        "spec.model.index.hnsw.efSearch",
        "below topK",
    ),
    ("spec.model.index.type", "LSH", "spec.model.index.type", "'Flat', 'HNSW', 'IVF-PQ' or 'SQ8'"),
    ("spec.model.version", "v 2", "spec.model.version", "pattern"),
    ("spec.rollout.interval", "5 minutes", "spec.rollout.interval", "not a duration"),
    ("spec.rollout.analysis.confidence", 1.5, "spec.rollout.analysis.confidence", "less than 1"),
    (
        "spec.rollout.analysis.maxErrorRate",
        -0.1,
        "spec.rollout.analysis.maxErrorRate",
        "greater than or equal to 0",
    ),
    ("spec.serving.replica", 3, "spec.serving.replica", "unknown field; did you mean 'replicas'?"),
    ("spec.gatway", {}, "spec.gatway", "unknown field; did you mean 'gateway'?"),
    (
        "spec.rollout.webhooks",
        [{"name": "smoke", "type": "pre-rollout", "url": "http://x", "timeoutSeconds": 5}],
        "spec.rollout.webhooks[0].timeoutSeconds",
        "unknown field; did you mean 'timeout'?",
    ),
    ("spec.features.ttl", "7d", "spec.features.ttl", "unknown field; expected one of image, "),
    ("spec.events.subscriptionType", "Exclusive", "spec.events.subscriptionType", "KeyShared"),
    ("spec.features.windows", ["1h", "1h"], "spec.features.windows", "distinct"),
    (
        "spec.features.store",
        {"mode": "cluster", "url": "redis://redis-cluster:6379/2"},
        "spec.features.store",
        "database 0 only",
    ),
    (
        "spec.features.store",
        {"mode": "cluster", "url": "unix:///run/redis.sock"},
        "spec.features.store",
        "cluster store URL",
    ),
    ("spec.model.archiveUri", "ftp://x/y.mar", "spec.model.archiveUri", "pattern"),
    (
        "spec.events.topics.interactions",
        {"retentionSizeMb": 100, "backlogQuotaMb": 200},
        "spec.events.topics.interactions.backlogQuotaMb",
        "below retentionSizeMb",
    ),
    (
        "spec.events.topics.impressions",
        {"retentionMinutes": 0, "retentionSizeMb": 10},
        "spec.events.topics.impressions.retentionMinutes",
        "both 0",
    ),
    ("metadata.name", "Has_Caps", "metadata.name", "pattern"),
    ("metadata.name", "x" * 49, "metadata.name", "at most 48"),
]


@pytest.mark.parametrize(
    ("path", "value", "expected_path", "phrase"),
    MISTAKES,
    ids=[f"{m[0]}={m[1]!r}"[:60] for m in MISTAKES],
)
def test_mistake_is_reported_at_its_field(
    path: str, value: Any, expected_path: str, phrase: str
) -> None:
    issues = issues_of(with_change(path, value))
    assert expected_path in issues, issues
    assert phrase in issues[expected_path]


def test_several_mistakes_are_all_reported_at_once() -> None:
    doc = with_change("spec.rollout.steps", [50, 10])
    doc = with_change("spec.serving.workers", 0, doc)
    doc = with_change("spec.gateway.timeoutMs", "fast", doc)
    assert {"spec.rollout.steps", "spec.serving.workers", "spec.gateway.timeoutMs"} <= issues_of(
        doc
    ).keys()


def test_missing_model_version_is_named() -> None:
    doc = quickstart()
    del doc["spec"]["model"]["version"]
    assert "spec.model.version" in issues_of(doc)


def test_unknown_kind_is_rejected() -> None:
    assert "kind" in issues_of(with_change("kind", "Recommender"))


# --- ScalingPolicy ----------------------------------------------------------------


def test_policy_rejects_inverted_bounds_and_hpa_scale_to_zero() -> None:
    with pytest.raises(InvalidResource) as info:
        parse_resource(
            {
                "apiVersion": "recsys.dev/v1alpha1",
                "kind": "ScalingPolicy",
                "metadata": {"name": "p"},
                "spec": {"serving": {"minReplicas": 5, "maxReplicas": 2}},
            }
        )
    assert [i.path for i in info.value.issues] == ["spec.serving.minReplicas"]
    with pytest.raises(InvalidResource) as info:
        parse_resource(
            {
                "apiVersion": "recsys.dev/v1alpha1",
                "kind": "ScalingPolicy",
                "metadata": {"name": "p"},
                "spec": {"engine": "hpa", "streamJobs": {"minReplicas": 0}},
            }
        )
    assert info.value.issues[0].path == "spec.streamJobs.minReplicas"
    assert "keda" in info.value.issues[0].message


@pytest.mark.parametrize(
    ("overrides", "field", "phrase"),
    [
        (
            {"maxReplicas": 20},
            "spec.scaling.maxReplicas",
            'exceeds ScalingPolicy "default" maxReplicas 8',
        ),
        ({"minReplicas": 0}, "spec.scaling.minReplicas", "is below"),
        ({"targetP99LatencyMs": 500}, "spec.scaling.targetP99LatencyMs", "exceeds"),
        ({"backlogPerReplica": 100000}, "spec.scaling.backlogPerReplica", "exceeds"),
        ({"minReplicas": 9}, "spec.scaling.minReplicas", "exceeds"),
    ],
)
def test_system_may_not_exceed_its_policy(
    overrides: dict[str, Any], field: str, phrase: str
) -> None:
    rs = RecommenderSystem.model_validate(with_change("spec.scaling", overrides))
    with pytest.raises(InvalidResource) as info:
        resolve_scaling(rs.spec, default_policy().spec, "default")
    messages = {i.path: i.message for i in info.value.issues}
    assert field in messages and phrase in messages[field], messages


def test_system_may_tighten_its_policy() -> None:
    doc = with_change(
        "spec.scaling", {"minReplicas": 2, "maxReplicas": 4, "targetP99LatencyMs": 50}
    )
    doc = with_change("spec.serving.replicas", 2, doc)
    effective = resolve_scaling(
        RecommenderSystem.model_validate(doc).spec, default_policy().spec, "default"
    )
    assert (effective.serving.min_replicas, effective.serving.max_replicas) == (2, 4)
    assert effective.target_p99_latency_ms == 50
    assert effective.backlog_per_replica == 5000  # from the policy


def test_initial_replicas_must_fit_the_effective_bounds() -> None:
    rs = RecommenderSystem.model_validate(with_change("spec.serving.replicas", 12))
    with pytest.raises(InvalidResource) as info:
        resolve_scaling(rs.spec, default_policy().spec, "default")
    assert info.value.issues[0].path == "spec.serving.replicas"


def test_overrides_without_a_policy_are_an_error() -> None:
    doc = with_change("spec.scaling", {"maxReplicas": 3})
    del doc["spec"]["scalingPolicyRef"]
    assert "spec.scaling" in issues_of(doc)


def test_validate_checks_systems_against_policies_given_together(tmp_path: Path) -> None:
    bad = with_change("spec.scaling", {"maxReplicas": 100})
    (tmp_path / "rs.yaml").write_text(yaml.safe_dump(bad))
    (tmp_path / "policy.yaml").write_text((EXAMPLES / "scaling-policy.yaml").read_text())
    report = validate_documents(load_documents([tmp_path]))
    assert not report.ok
    assert any("spec.scaling.maxReplicas" in line for line in report.lines())


@pytest.mark.parametrize("api_version", [None, "v1alpha1", "recsys.io/v1alpha1"])
def test_our_kinds_without_our_api_group_are_not_silently_passed(api_version: str | None) -> None:
    doc = quickstart()
    if api_version is None:
        del doc["apiVersion"]
    else:
        doc["apiVersion"] = api_version
    report = validate_documents([Document("rs.yaml", 0, doc)])
    if api_version is None or "/" not in api_version:  # kubectl would refuse it too
        assert not report.ok
        assert (
            f"      apiVersion: expected recsys.dev/v1alpha1, got {api_version or ''!r}"
            in report.lines()
        )
    else:  # maybe another project's RecommenderSystem: skipped, but saying ours is
        assert report.ok
        assert "(this project's is apiVersion recsys.dev/v1alpha1)" in report.notes[0]


# --- value types ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("2d", 172800)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", 0.5),
        ("2Gi", 2 * 2**30),
        ("1", 1.0),
        (4, 4.0),
        ("1e3", 1000.0),
        ("128Mi", 128 * 2**20),
    ],
)
def test_quantities(text: str | int, value: float) -> None:
    assert quantity_value(text) == pytest.approx(value)
