"""`spec.training`: retraining the model from the offline event log, and the gate it must pass.

The operator renders a CronJob that runs `recsys retrain` on `schedule` (or, with
`engine: RayJob` on a cluster that serves KubeRay's `ray.io`, a RayCronJob that starts a
RayJob on a Ray cluster of its own): it reads the last `window` of the log, trains a candidate, scores it and the stable model on the
same newest held-out slice, and publishes the candidate to the model store only when
the gate passes. The verdict lands next to the archives.

Besides the schedule, `triggers` start a run when the stable version's online CTR falls
(performance) or when the scores served drift from the training window's (drift): the
operator evaluates them against Prometheus and creates a Job from the CronJob's
template, so a triggered run is the same run as a scheduled one
(recsys_operator.controller.training_triggers).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ConfigDict, Field, field_validator, model_validator

from recsys_contracts.api_base import ApiModel, Duration, field_error
from recsys_operator.api import cel
from recsys_operator.api.cron import CRON_PATTERN, cron_problem
from recsys_operator.api.recommender_system import ResourceRequirements

GATE_METRIC_PATTERN = r"^(ndcg|recall|mrr)@[1-9][0-9]{0,2}$"
LOG_URI_PATTERN = r"^(s3://|pvc://|file://).+"
MODEL_STORE_URI_PATTERN = r"^(s3://|pvc://|file://).+"


class GateSpec(ApiModel):
    """What a candidate must show, against the stable model on the same newest held-out slice, to be published."""

    metric: str = Field(default="ndcg@10", pattern=GATE_METRIC_PATTERN)
    """Offline metric compared: ndcg, recall or mrr at a cutoff (e.g. `ndcg@10`, `recall@50`), averaged over the slice's users."""
    min_relative_improvement: float = Field(default=0.01, ge=0.0, le=10.0)
    """The candidate must score at least stable × (1 + this); 0.01 asks for 1% better. Whatever this is, the 95% interval of the per-user paired difference (candidate − stable on the same held-out users, bootstrap) must also lie above 0, so 0 asks for better beyond noise."""
    min_users: int = Field(default=100, ge=1)
    """Users in the held-out slice (each user's newest 20% of the window) needed before the comparison counts; fewer gates the run out."""


class PerformanceTrigger(ApiModel):
    """Retrain when the stable version's online CTR falls (clicks / impressions of its answers, from the gateway's counters); measured once at least 500 impressions are in the window."""

    model_config = ConfigDict(
        json_schema_extra=cel.rules(
            cel.rule(
                "has(self.minCtr) || has(self.maxCtrDrop)",
                "give minCtr, maxCtrDrop or both",
            )
        )
    )

    min_ctr: float | None = Field(default=None, gt=0.0, le=1.0)
    """Retrain when the stable CTR over `window` is below this floor."""
    max_ctr_drop: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Retrain when the stable CTR over `window` is this fraction below the CTR of the window before it (0.1: down 10%); both windows need 500 impressions."""
    window: Duration = "6h"
    """Window the CTR is measured over."""

    @model_validator(mode="after")
    def _one_condition(self) -> Self:
        if self.min_ctr is None and self.max_ctr_drop is None:
            raise field_error("minCtr", "give minCtr, maxCtrDrop or both")
        return self


class DriftSource(StrEnum):
    USER_FEATURES = "UserFeatures"
    SERVED_SCORES = "ServedScores"


class DriftTest(StrEnum):
    PSI = "PSI"
    KS = "KS"


class DriftTrigger(ApiModel):
    """Retrain when recent data no longer looks like the data the stable model was trained on: the distribution over `window` is compared with the one over the training window (spec.training.window) before it, each with at least 500 observations."""

    model_config = ConfigDict(
        json_schema_extra=cel.rules(
            cel.rule(
                "self.test != 'KS' || double(self.threshold) <= 1.0",
                "a KS statistic lies in 0..1",
                ".threshold",
            )
        )
    )

    source: DriftSource = DriftSource.SERVED_SCORES
    """What is compared: ServedScores, the best score of each answer the stable version ranked (the gateway's histogram); UserFeatures is not supported yet (the TrainingTriggers condition says so and nothing fires)."""
    test: DriftTest = DriftTest.PSI
    """PSI (population stability index) or KS (the Kolmogorov-Smirnov statistic)."""
    threshold: float = Field(default=0.2, gt=0.0, le=10.0)
    """Drift beyond this retrains (PSI: 0.1 is a moderate shift, 0.25 a large one; KS: a statistic in 0..1)."""
    window: Duration = "24h"
    """Recent window compared with the training window before it."""

    @model_validator(mode="after")
    def _ks_is_a_fraction(self) -> Self:
        if self.test is DriftTest.KS and self.threshold > 1.0:
            raise field_error("threshold", "a KS statistic lies in 0..1")
        return self


class TriggersSpec(ApiModel):
    """Conditions that start a run besides the schedule, evaluated about once a minute."""

    performance: PerformanceTrigger | None = None
    """On a fall of the stable CTR."""
    drift: DriftTrigger | None = None
    """On data drift."""
    cooldown: Duration | None = None
    """After any training run started (by a trigger or the schedule), no trigger starts another for this long; defaults to the longest window of the triggers set, so the next decision reads data the last run could not have seen."""


class TrainingEngine(StrEnum):
    CRON_JOB = "CronJob"
    RAY_JOB = "RayJob"


RAY_VERSION_PATTERN = r"^[0-9]+\.[0-9]+\.[0-9]+$"


class RayWorkers(ApiModel):
    """The Ray cluster's worker group."""

    replicas: int = Field(default=0, ge=0, le=1000)
    """Worker pods beside the head. The trainer (recency EASE) is one process today and runs on the head as the Ray job's driver: workers only add capacity for Ray tasks, so 0 is the right count until the trainer is distributed."""
    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "2", "memory": "4Gi"}, limits={"memory": "8Gi"}
        )
    )
    """Resources of each worker pod."""


class RaySpec(ApiModel):
    """The Ray cluster a RayJob run gets (KubeRay creates it for the run and deletes it after)."""

    image: str
    """Image of the head, the workers and the submitter: it must hold Ray at `rayVersion` and this project's model-server packages (`recsys retrain`), and run as a non-root user (uid 1000, as the rayproject/ray images do). The default training image holds no Ray, so there is no default."""
    ray_version: str = Field(default="2.52.0", pattern=RAY_VERSION_PATTERN)
    """Ray version of the image (KubeRay's rayVersion), e.g. `2.52.0`."""
    workers: RayWorkers = Field(default_factory=RayWorkers)
    """The worker group."""


class TrainingSpec(ApiModel):
    """Retraining from the offline event log on a schedule, with a gate before anything is published."""

    model_config = ConfigDict(
        json_schema_extra=cel.rules(
            cel.rule(
                "!has(self.engine) || self.engine != 'RayJob' || has(self.ray)",
                "engine RayJob needs spec.training.ray (at least its image)",
                ".ray",
            ),
            cel.rule(
                "!has(self.engine) || self.engine != 'RayJob' || !has(self.timeZone)",
                "a RayCronJob has no time zone: give the schedule in UTC",
                ".timeZone",
            ),
        )
    )

    engine: TrainingEngine = TrainingEngine.CRON_JOB
    """What runs each training: `CronJob`, a batch/v1 CronJob whose pod runs `recsys retrain`; or `RayJob`, a KubeRay RayCronJob (KubeRay 1.6 or later, where the cluster serves ray.io) that starts a RayJob on a Ray cluster of its own for each run (`ray`). A cluster without ray.io reports the system not Ready with reason TrainingEngineNotServed."""
    ray: RaySpec | None = None
    """The Ray cluster of each run; required with engine RayJob, ignored otherwise."""

    schedule: str = Field(default="0 3 * * *", pattern=CRON_PATTERN)
    """When runs start, as a CronJob schedule (five fields or a macro such as `@daily`)."""
    time_zone: str | None = None
    """IANA time zone of the schedule (e.g. `Europe/Berlin`); the controller manager's (usually UTC) when omitted."""
    suspend: bool = False
    """Start no new runs (a run in progress finishes)."""
    triggers: TriggersSpec = Field(default_factory=TriggersSpec)
    """Runs on performance or drift, besides the schedule."""
    log_uri: str = Field(pattern=LOG_URI_PATTERN)
    """Root of the offline event log (it holds `interactions/date=…/hour=…/*.parquet`): s3://BUCKET/PREFIX (credentials from the pod's service account), pvc://CLAIM/PATH, or file:// (local mode)."""
    model_store_uri: str = Field(pattern=MODEL_STORE_URI_PATTERN)
    """Folder holding the archives: the stable version's is read from it, a passing candidate is written to it as `<name>-<version>.mar`, and every verdict as `<name>.training.json`. In a cluster s3://BUCKET/PREFIX (read and written with the pod's service-account credentials, as the log) or pvc://CLAIM/PATH (the run mounts it read-write); file:// in local mode."""
    window: Duration = "7d"
    """How far back the log is read for one run."""
    min_interactions: int = Field(default=10_000, ge=1)
    """Interactions the window must hold before anything is trained; fewer gates the run out."""
    gate: GateSpec = Field(default_factory=GateSpec)
    """What a candidate must show to be published."""
    auto_rollout: bool = False
    """A published candidate starts a progressive rollout by itself, from status.training (the spec is left as written), until a person changes spec.model.version. Off: a person rolls it out by setting spec.model.version and archiveUri."""
    image: str | None = None
    """Container image of the run (it runs `recsys retrain`); defaults to the model-server image of the operator's own version, which holds torch, FAISS and the archiver."""
    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "2", "memory": "4Gi"}, limits={"memory": "8Gi"}
        )
    )
    """Resources of the training pod (with engine RayJob: of the Ray head, where the trainer runs)."""
    deadline: Duration = "2h"
    """A run still going after this long is stopped (the Job's activeDeadlineSeconds); it publishes nothing."""

    @model_validator(mode="after")
    def _ray_engine_complete(self) -> Self:
        if self.engine is TrainingEngine.RAY_JOB:
            if self.ray is None:
                raise field_error(
                    "ray", "engine RayJob needs spec.training.ray (at least its image)"
                )
            if self.time_zone is not None:
                raise field_error(
                    "timeZone", "a RayCronJob has no time zone: give the schedule in UTC"
                )
        return self

    @field_validator("schedule")
    @classmethod
    def _schedule_valid(cls, value: str) -> str:
        problem = cron_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("time_zone")
    @classmethod
    def _zone_known(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}; give an IANA name such as UTC or Europe/Berlin"
            ) from None
        return value
