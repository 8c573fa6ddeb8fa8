"""The routing file: the renderer's output parses; bad files never replace good ones."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.routing import ReloadResult, RoutingError, RoutingWatcher, parse_routing
from recsys_contracts.variant_assignment import Variant
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.render.gateway import gateway_routing
from recsys_operator.render.traffic import TrafficPlan

ROOT = Path(__file__).resolve().parents[2]


def quickstart() -> RecommenderSystem:
    doc = next(yaml.safe_load_all((ROOT / "examples" / "quickstart.yaml").read_text()))
    return RecommenderSystem.model_validate(doc)


def rendered(plan: TrafficPlan) -> dict[str, Any]:
    # Through JSON, as the ConfigMap carries it.
    return json.loads(json.dumps(gateway_routing(quickstart(), plan)))


def test_the_renderers_routing_parses() -> None:
    document = rendered(TrafficPlan("1", "2", 25))
    routing = parse_routing(json.dumps(document))
    assert routing.system == document["system"]
    assert (routing.stable.version, routing.canary and routing.canary.version) == ("1", "2")
    assert routing.stable.url == document["stable"]["url"]
    assert routing.effective_canary_weight == 25
    assert (routing.timeout_ms, routing.default_k, routing.max_k) == (
        document["timeoutMs"],
        document["defaultK"],
        document["maxK"],
    )
    assert routing.impressions_topic == document["impressionsTopic"]
    assert routing.interactions_topic == document["interactionsTopic"]
    assert routing.pulsar_service_url == document["pulsarServiceUrl"]


def test_without_a_canary_everyone_is_stable() -> None:
    routing = parse_routing(json.dumps(rendered(TrafficPlan("1"))))
    assert routing.canary is None
    assert {routing.variant_for(f"u{n}") for n in range(200)} == {Variant.STABLE}
    # Even a stray weight means nothing without a canary to send users to.
    stray = rendered(TrafficPlan("1")) | {"canaryWeight": 50}
    assert parse_routing(json.dumps(stray)).effective_canary_weight == 0


def test_unknown_fields_are_ignored() -> None:
    # A newer operator may add fields before every gateway knows them.
    document = rendered(TrafficPlan("1", "2", 10)) | {"shadowTraffic": {"version": "3"}}
    assert parse_routing(json.dumps(document)).canary_weight == 10


def _broken(change: dict[str, Any]) -> str:
    document = copy.deepcopy(rendered(TrafficPlan("1", "2", 10)))
    for key, value in change.items():
        if value is None:
            document.pop(key)
        else:
            document[key] = value
    return json.dumps(document)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("{not json", "(file)"),
        ("[]", "(file)"),
        (_broken({"canaryWeight": 101}), "canaryWeight"),
        (_broken({"stable": None}), "stable"),
        (_broken({"defaultK": 60, "maxK": 50}), "defaultK"),
        (_broken({"timeoutMs": 0}), "timeoutMs"),
        (
            _broken({"stable": {"version": "fallback", "url": "http://x/p/m/fallback"}}),
            "stable.version",
        ),
        (_broken({"canary": {"version": "2", "url": "ftp://x"}}), "canary.url"),
    ],
)
def test_invalid_routing_is_refused_with_the_place(text: str, where: str) -> None:
    with pytest.raises(RoutingError) as caught:
        parse_routing(text)
    assert caught.value.result is ReloadResult.INVALID
    assert where in str(caught.value)


def test_the_watcher_applies_good_files_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = tmp_path / "routing.json"
    path.write_text(json.dumps(rendered(TrafficPlan("1", "2", 10))))
    results: list[ReloadResult] = []
    watcher = RoutingWatcher(path, on_reload=results.append)
    assert watcher.check() is None  # unchanged: nothing to do

    path.write_text(json.dumps(rendered(TrafficPlan("1", "2", 50))))
    assert watcher.check() is ReloadResult.OK
    assert watcher.current.canary_weight == 50

    # A half-written file (a writer that truncates, then writes) is refused once...
    whole = json.dumps(rendered(TrafficPlan("1")))
    path.write_text(whole[: len(whole) // 2])
    assert watcher.check() is ReloadResult.INVALID
    assert watcher.check() is None
    assert watcher.current.canary_weight == 50
    # ...and applied as soon as it is complete.
    path.write_text(whole)
    assert watcher.check() is ReloadResult.OK
    assert watcher.current.canary is None

    path.unlink()
    assert watcher.check() is ReloadResult.UNREADABLE
    assert watcher.check() is None  # reported once, not every poll
    assert watcher.current.stable.version == "1"
    path.write_text(json.dumps(rendered(TrafficPlan("2"))))
    assert watcher.check() is ReloadResult.OK
    assert watcher.current.stable.version == "2"

    assert results == [
        ReloadResult.OK,
        ReloadResult.INVALID,
        ReloadResult.OK,
        ReloadResult.UNREADABLE,
        ReloadResult.OK,
    ]


def test_a_gateway_cannot_start_without_a_valid_routing(tmp_path: Path) -> None:
    with pytest.raises(RoutingError, match="cannot read"):
        RoutingWatcher(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(RoutingError, match="invalid routing"):
        RoutingWatcher(tmp_path / "bad.json")
