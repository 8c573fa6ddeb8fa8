"""`spec.training`: schedules the CronJob would refuse, and a gate or trigger that means
nothing, are refused when the RecommenderSystem is applied, with the field named."""

from __future__ import annotations

from typing import Any

import pytest

from recsys_operator.api.cron import cron_problem
from recsys_operator.api.resources import RecommenderSystem

from .test_admission import admission_problems
from .test_validation import issues_of, with_change

TRAINING = {"logUri": "s3://event-log/quickstart", "modelStoreUri": "pvc://models/retrieval"}


def with_training(**fields: Any) -> dict[str, Any]:
    return with_change("spec.training", {**TRAINING, **fields})


@pytest.mark.parametrize(
    "schedule",
    [
        "0 3 * * *",
        "*/15 2-4 * JAN-MAR MON-FRI",
        "0 0 1,15 * ?",
        "5 4 * * sun",
        "@daily",
        "0-30/10 * * * *",
    ],
)
def test_schedules_a_cronjob_accepts_are_accepted(schedule: str) -> None:
    assert cron_problem(schedule) is None
    system = RecommenderSystem.model_validate(with_training(schedule=schedule))
    assert system.spec.training is not None and system.spec.training.schedule == schedule
    assert admission_problems(with_training(schedule=schedule)) == []


@pytest.mark.parametrize(
    ("schedule", "phrase"),
    [
        ("61 * * * *", "not in 0-59"),
        ("0 24 * * *", "not in 0-23"),
        ("0 3 0 * *", "not in 1-31"),
        ("0 3 * 13 *", "not in 1-12"),
        ("0 3 * * 8", "not in 0-6"),
        ("0 3 * * FUN", "not in 0-6"),
        ("30-10 * * * *", "runs backwards"),
        ("*/0 * * * *", "positive number"),
        ("? * * * *", "only for the day"),
    ],
)
def test_a_schedule_with_a_bad_value_is_refused_naming_the_field(
    schedule: str, phrase: str
) -> None:
    issues = issues_of(with_training(schedule=schedule))
    assert phrase in issues["spec.training.schedule"]


@pytest.mark.parametrize("schedule", ["0 3 * *", "@often", "TZ=UTC 0 3 * * *", "every night"])
def test_a_schedule_of_the_wrong_shape_is_refused_at_admission_too(schedule: str) -> None:
    assert "spec.training.schedule" in issues_of(with_training(schedule=schedule))
    assert any(
        p.startswith("spec.training.schedule")
        for p in admission_problems(with_training(schedule=schedule))
    )


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"gate": {"metric": "auc@10"}}, "spec.training.gate.metric"),
        ({"gate": {"minUsers": 0}}, "spec.training.gate.minUsers"),
        ({"gate": {"minRelativeImprovement": -0.1}}, "spec.training.gate.minRelativeImprovement"),
        ({"logUri": "ftp://somewhere/log"}, "spec.training.logUri"),
        ({"modelStoreUri": "https://models/store"}, "spec.training.modelStoreUri"),
        ({"engine": "RayJob"}, "spec.training.ray"),
        (
            {"engine": "RayJob", "ray": {"image": "ray:2.52.0"}, "timeZone": "Europe/Berlin"},
            "spec.training.timeZone",
        ),
        ({"engine": "Spark"}, "spec.training.engine"),
        ({"triggers": {"performance": {"window": "1h"}}}, "spec.training.triggers.performance"),
        ({"triggers": {"drift": {"test": "KS", "threshold": 2}}}, "spec.training.triggers.drift"),
    ],
)
def test_a_gate_store_or_trigger_that_means_nothing_is_refused_by_models_and_admission(
    fields: dict[str, Any], path: str
) -> None:
    doc = with_training(**fields)
    assert any(p.startswith(path) for p in issues_of(doc)), issues_of(doc)
    problems = admission_problems(doc)
    assert any(p.split(": ")[0].startswith(path) for p in problems), problems


def test_an_unknown_time_zone_is_refused() -> None:
    assert (
        "unknown time zone"
        in issues_of(with_training(timeZone="Mars/Olympus"))["spec.training.timeZone"]
    )


def test_training_defaults_run_nightly_behind_a_gate_and_never_roll_out_alone() -> None:
    training = RecommenderSystem.model_validate(with_training()).spec.training
    assert training is not None
    assert (training.schedule, training.window, training.auto_rollout) == ("0 3 * * *", "7d", False)
    assert training.gate.metric == "ndcg@10" and training.gate.min_relative_improvement > 0
    assert (
        RecommenderSystem.model_validate(with_change("spec.model.version", "1")).spec.training
        is None
    )
