"""The verdict of one training run: what the trainer writes and the operator reads.

A training run (`recsys retrain`) reads a window of the offline event log, trains a
candidate, scores it and the stable model on the same newest held-out slice, and
applies the gate. Whatever the outcome, it writes this report into the model store,
next to the archives:

| file | content |
|---|---|
| `<name>.training.json` | the latest run's verdict (replaced atomically at the end of each run) |
| `training/<name>-<candidate version>.json` | every run's verdict, kept |

Only a run whose result is `Passed` has published `<name>-<candidate version>.mar`;
`GatedOut` and `Failed` runs publish no archive.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from recsys_contracts.api_base import ApiModel

TRAINING_REPORTS_FOLDER = "training"


def latest_report_file_name(model_name: str) -> str:
    """The latest run's verdict, in the model store's top folder."""
    return f"{model_name}.training.json"


def report_file_name(model_name: str, candidate_version: str) -> str:
    """One run's verdict, under `TRAINING_REPORTS_FOLDER`."""
    return f"{model_name}-{candidate_version}.json"


class GateResult(StrEnum):
    PASSED = "Passed"
    """The candidate beat the stable model by the margin asked: its archive is published."""
    GATED_OUT = "GatedOut"
    """Too little data, too few users, not better enough, or better only within the
    noise of the paired comparison: nothing is published."""
    FAILED = "Failed"
    """The run broke (unreadable log, missing stable archive, ...): nothing is published."""


class GateSettings(ApiModel):
    """The thresholds the run applied (a copy of `spec.training.gate` and the data minimum)."""

    metric: str
    """Offline metric compared, e.g. `ndcg@10`."""
    min_relative_improvement: float
    """Candidate score must be at least stable score × (1 + this), and the 95% interval of
    the paired per-user difference must lie above 0."""
    min_users: int
    """Users in the held-out slice needed before the comparison counts."""
    min_interactions: int
    """Interactions the window must hold before anything is trained."""


class ModelScore(ApiModel):
    """One model's score on the held-out slice."""

    version: str
    value: float
    """The gate metric, averaged over the slice's users."""
    ci95: float | None = None
    """Half-width of its 95% interval over users."""
    users: int
    """Users scored."""


class PairedComparison(ApiModel):
    """Candidate − stable on the gate metric, user by user, over the users both scored."""

    users: int
    """Users scored by both models."""
    mean_difference: float
    """Mean over those users of the candidate's value minus the stable's."""
    ci95_low: float
    """Low end of the 95% interval of the mean difference (percentile bootstrap over
    users); the gate asks for it above 0, so a candidate better only by chance is not
    published."""
    ci95_high: float
    """High end of that interval."""


class TrainingVerdict(ApiModel):
    """`<name>.training.json`: what one training run did and why."""

    format: Literal[1] = 1
    model_name: str
    candidate_version: str
    """The version the candidate has (or would have had, if it had passed)."""
    stable_version: str | None = None
    """The version it was compared with; none on a first run with nothing to compare."""
    started_at: str
    """RFC 3339."""
    finished_at: str
    """RFC 3339."""
    window_start_ms: int
    window_end_ms: int
    """The log window read: `window_start_ms <= ts < window_end_ms`."""
    interactions: int = Field(default=0, ge=0)
    """Interactions in the window (after de-duplication by event id)."""
    gate: GateSettings
    candidate: ModelScore | None = None
    stable: ModelScore | None = None
    relative_improvement: float | None = None
    """candidate / stable - 1 on the gate metric (none without both scores, or a zero stable)."""
    paired: PairedComparison | None = None
    """The per-user paired difference and its interval (none without both scores)."""
    result: GateResult
    reason: str
    """Why, with the numbers."""
    archive: str | None = None
    """File name of the published archive in the model store (only when Passed)."""
