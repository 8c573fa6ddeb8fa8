"""One training run from the offline event log, with the gate that decides whether it ships.

1. Read the interactions of a window (`since_ms <= ts < until_ms`) from the log,
   de-duplicated by event id (the sink writes at least once). Too few: gated out.
2. Split them with the project's protocol (`evaluation.per_user_split`): each user's
   newest 20% is the held-out slice, the rest is what the candidate trains on.
3. Train the default model (recency EASE) on the rest, and score it and the stable model
   (unpacked from its archive in the model store) on the same slice with the same code
   (`model_evaluation.evaluate_model_directory`). Items the stable model never saw stay
   targets it cannot hit: that is what a stale model costs.
4. The gate: enough users in the slice, candidate >= stable × (1 + min improvement)
   on the gate metric, and the 95% interval of the per-user paired difference
   (candidate − stable on the same users, `paired_comparison`) above 0. Only then is
   the candidate packed as `<name>-<version>.mar` into the model store (a folder or
   s3://, `model_store`), with the stable archive's index and serving settings. The model
   published is the one the gate scored (it has not seen the slice).
5. Whatever happened, the verdict (`recsys_contracts.training_report`) is written next
   to the archives, where the operator reads it. A failed or gated-out run publishes
   no archive.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
from botocore.exceptions import BotoCoreError

from model_handlers.archive import ArchiveError, ArchiveRequest, build_archive
from model_handlers.evaluation import Evaluation, per_user_split
from model_handlers.interactions import Interactions, from_id_columns
from model_handlers.model_directory import read_manifest, write_trained_model
from model_handlers.model_evaluation import evaluate_model_directory
from model_handlers.model_store import ModelStore
from model_handlers.paired_comparison import pair_by_user, paired_difference
from model_handlers.training import TrainingConfig, train_model
from recsys_contracts import archive_layout, event_log_layout, training_report
from recsys_contracts.archive_layout import ServingDefaults
from recsys_contracts.events import INTERACTION_TYPES
from recsys_contracts.index_spec import IndexSpec
from recsys_contracts.training_report import (
    GateResult,
    GateSettings,
    ModelScore,
    PairedComparison,
    TrainingVerdict,
)

GATE_METRICS = ("ndcg", "recall", "mrr")
MAX_REASON_CHARS = 1500
"""A failure's reason is cut to this, so the whole verdict fits a Kubernetes termination
message (4096 bytes), the channel a cluster run reports it through."""
"""Metric families the gate compares (at any cutoff, e.g. `ndcg@10`)."""

Say = Callable[[str], None]

STORE_ERRORS: tuple[type[Exception], ...] = (OSError, BotoCoreError)
"""What an unreachable or refusing log or model store raises (s3fs turns S3's answers
into OSError; botocore raises its own for missing credentials or a dead endpoint)."""


# --- the log --------------------------------------------------------------------------


def read_interactions(
    uri: str, since_ms: int, until_ms: int, storage_options: dict[str, Any] | None = None
) -> pa.Table:
    """Rows of the log's `interactions` dataset with `since_ms <= ts < until_ms`
    (`recsys_contracts.event_log_layout`), with a clear error when a local log is missing
    (the contract's reader gives an empty table there, which would read as "no traffic")."""
    parsed = urlparse(uri)
    root = parsed.path if parsed.scheme == "file" else uri
    local = not parsed.scheme or parsed.scheme == "file"
    if local and not Path(root, "interactions").is_dir():
        raise FileNotFoundError(f"no event log at {uri} (no interactions/ folder)")
    return event_log_layout.read_interactions(uri, since_ms, until_ms, storage_options)


def interactions_from_events(table: pa.Table) -> Interactions:
    """The interactions (every type but impressions) of an event table, one per event id."""
    types = np.asarray(table.column("type").to_pylist(), dtype=object)
    keep = np.isin(types, sorted(str(t) for t in INTERACTION_TYPES))
    event_ids = np.asarray(table.column("event_id").to_pylist(), dtype=object)[keep]
    # At-least-once delivery: an event may be in the log twice; keep its first row.
    _, first = np.unique(event_ids, return_index=True)
    rows = np.flatnonzero(keep)[np.sort(first)]

    def column(name: str) -> np.ndarray:
        return np.asarray(table.column(name).to_pylist(), dtype=object)[rows]

    dwell = np.asarray([d or 0 for d in column("dwell_ms")], dtype=np.int64)
    log = from_id_columns(
        column("user_id").astype(str),
        column("item_id").astype(str),
        column("ts").astype(np.int64),
        dwell_ms=np.minimum(dwell, np.iinfo(np.int32).max),
    )
    return log.sorted_by_time()


# --- the run --------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    metric: str = "ndcg@10"
    min_relative_improvement: float = 0.0
    """Candidate must score at least stable × (1 + this); 0.02 asks for 2% better. In any
    case the paired per-user difference's 95% interval must lie above 0."""
    min_users: int = 100
    """Users in the held-out slice needed before the comparison counts."""
    min_interactions: int = 1000
    """Interactions the window must hold before anything is trained."""

    def __post_init__(self) -> None:
        family, _, cutoff = self.metric.partition("@")
        if family not in GATE_METRICS or not cutoff.isdigit() or int(cutoff) < 1:
            raise ValueError(
                f"gate metric {self.metric!r}: give one of {', '.join(GATE_METRICS)} at a "
                "cutoff, e.g. ndcg@10"
            )
        if self.min_users < 1 or self.min_interactions < 1:
            raise ValueError("gate: min users and min interactions must be at least 1")

    @property
    def cutoff(self) -> int:
        return int(self.metric.partition("@")[2])

    def settings(self) -> GateSettings:
        return GateSettings(
            metric=self.metric,
            min_relative_improvement=self.min_relative_improvement,
            min_users=self.min_users,
            min_interactions=self.min_interactions,
        )


@dataclass(frozen=True)
class TrainingRun:
    log_uri: str
    model_store: str | Path
    """Where the stable archive is read and a passing candidate and every verdict go:
    a folder, file:// or s3://BUCKET/PREFIX (`model_store.ModelStore`)."""
    model_name: str
    candidate_version: str
    since_ms: int
    until_ms: int
    stable_version: str | None = None
    """None: a first run; the candidate is judged on the data minimums alone."""
    gate: Gate = field(default_factory=Gate)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    index: IndexSpec | None = None
    """Index of the published archive; None: the stable archive's (else the default)."""
    top_k: int | None = None
    """Largest k of the published archive; None: the stable archive's (else 50)."""
    storage_options: dict[str, Any] | None = None
    """fsspec options (S3 credentials, endpoint) for an s3:// log and model store; None:
    botocore's environment."""


class TrainingRunError(RuntimeError):
    """The run could not be carried out (as opposed to a candidate the gate refused)."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def run_training(run: TrainingRun, *, say: Say | None = None) -> TrainingVerdict:
    """Carry out `run`, publish the candidate only if it passes, and write the verdict."""
    say = say or (lambda message: None)
    started = _now()
    store = ModelStore(run.model_store, run.storage_options)
    facts: dict[str, object] = {}
    try:
        result, reason = _train_and_judge(run, store, facts, say)
    except (ArchiveError, ValueError, TrainingRunError, pa.ArrowException, *STORE_ERRORS) as exc:
        result, reason = GateResult.FAILED, f"{type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
        facts.pop("archive", None)
    verdict = TrainingVerdict(
        model_name=run.model_name,
        candidate_version=run.candidate_version,
        stable_version=run.stable_version,
        started_at=started,
        finished_at=_now(),
        window_start_ms=run.since_ms,
        window_end_ms=run.until_ms,
        gate=run.gate.settings(),
        result=result,
        reason=reason,
        **facts,
    )
    try:
        write_verdict(verdict, store)
    except STORE_ERRORS as exc:
        # The verdict still reaches the operator (stdout, the termination message).
        problem = f"; the verdict could not be written to the model store: {exc}"
        cut = MAX_REASON_CHARS - len(problem[:300])
        return verdict.model_copy(update={"reason": verdict.reason[:cut] + problem[:300]})
    return verdict


def _train_and_judge(
    run: TrainingRun, store: ModelStore, facts: dict[str, object], say: Say
) -> tuple[GateResult, str]:
    """(result, reason); fills `facts` with the verdict's numbers as they become known."""
    gate = run.gate
    stable_archive = None
    if run.stable_version is not None:
        stable_archive = archive_layout.mar_file_name(run.model_name, run.stable_version)
        if not store.exists(stable_archive):
            raise TrainingRunError(
                f"the stable model's archive {store.location(stable_archive)} is missing"
            )
    candidate_archive = archive_layout.mar_file_name(run.model_name, run.candidate_version)
    if store.exists(candidate_archive):
        raise TrainingRunError(
            f"{store.location(candidate_archive)} exists already: a candidate needs a "
            "version of its own"
        )

    say(f"reading the log {run.log_uri} from {run.since_ms} to {run.until_ms} (ms)")
    table = read_interactions(run.log_uri, run.since_ms, run.until_ms, run.storage_options)
    log = interactions_from_events(table) if table.num_rows else None
    count = len(log) if log is not None else 0
    facts["interactions"] = count
    if log is None or count < gate.min_interactions:
        return (
            GateResult.GATED_OUT,
            f"{count} interactions in the window, fewer than the {gate.min_interactions} needed",
        )
    fit, slice_ = per_user_split(log)
    say(
        f"{count} interactions, {log.num_users} users, {log.num_items} items; training "
        f"{run.training.model} on {len(fit)}, holding out the newest {len(slice_)}"
    )
    with tempfile.TemporaryDirectory(prefix="recsys-retrain-") as work:
        candidate_dir = Path(work) / "candidate"
        write_trained_model(train_model(fit, run.training, on_message=None), candidate_dir)
        candidate = evaluate_model_directory(candidate_dir, fit, slice_, cutoffs=(gate.cutoff,))
        facts["candidate"] = _score(run.candidate_version, candidate, gate.metric)
        say(
            f"candidate {run.candidate_version}: {gate.metric} {candidate.metrics[gate.metric]:.4f}"
        )
        if candidate.users < gate.min_users:
            return (
                GateResult.GATED_OUT,
                f"{candidate.users} users in the held-out slice, fewer than the "
                f"{gate.min_users} needed",
            )
        index, top_k, serving = run.index, run.top_k, ServingDefaults()
        if stable_archive is not None:
            stable_dir = Path(work) / "stable"
            packed_stable = store.fetch(stable_archive, Path(work) / stable_archive)
            with zipfile.ZipFile(packed_stable) as packed:
                packed.extractall(stable_dir)
            stable = evaluate_model_directory(stable_dir, fit, slice_, cutoffs=(gate.cutoff,))
            facts["stable"] = _score(str(run.stable_version), stable, gate.metric)
            say(f"stable {run.stable_version}: {gate.metric} {stable.metrics[gate.metric]:.4f}")
            manifest = read_manifest(stable_dir)
            index = index or manifest.index
            top_k = top_k or manifest.top_k
            serving = manifest.serving
            judgement = judge(candidate, stable, gate, run.stable_version)
            result, reason = judgement.result, judgement.reason
            facts["relative_improvement"] = judgement.relative_improvement
            facts["paired"] = judgement.paired
        else:
            result = GateResult.PASSED
            reason = (
                f"first model: no stable version to compare with; {gate.metric} "
                f"{candidate.metrics[gate.metric]:.4f} on {candidate.users} users"
            )
        if result is not GateResult.PASSED:
            return result, reason
        num_items = log.num_items
        built = build_archive(
            ArchiveRequest(
                model_dir=candidate_dir,
                # Packed here, then put into the store whole (a remote store gets one upload).
                out_dir=store.local or Path(work) / "out",
                name=run.model_name,
                version=run.candidate_version,
                index=index or IndexSpec(),
                top_k=min(top_k or 50, num_items),
                serving=serving,
            ),
            on_progress=say,
        )
        store.publish(built.path, candidate_archive)
        facts["archive"] = candidate_archive
        return result, reason


def _score(version: str, evaluation: Evaluation, metric: str) -> ModelScore:
    half = evaluation.ci95.get(metric)
    return ModelScore(
        version=version,
        value=round(evaluation.metrics[metric], 6),
        ci95=None if half is None or np.isnan(half) else round(half, 6),
        users=evaluation.users,
    )


@dataclass(frozen=True)
class Judgement:
    result: GateResult
    reason: str
    """Why, with the numbers."""
    relative_improvement: float | None
    paired: PairedComparison


def judge(
    candidate: Evaluation, stable: Evaluation, gate: Gate, stable_version: str | None
) -> Judgement:
    """The gate on two evaluations of the same held-out slice.

    Passes when the candidate's mean is at least stable × (1 + min improvement) AND the
    95% interval of the per-user paired difference (candidate − stable, users both
    scored) lies above 0: a mean that is higher only because of which users happened to
    be in the slice is not an improvement."""
    new, old = candidate.metrics[gate.metric], stable.metrics[gate.metric]
    needed = old * (1.0 + gate.min_relative_improvement)
    improvement = round(new / old - 1.0, 6) if old > 0 else None
    change = f"{improvement:+.1%}" if improvement is not None else "stable scored 0"
    if candidate.user_keys is None or stable.user_keys is None:
        raise ValueError("the gate pairs users: evaluations need their per-user values")
    pairs = paired_difference(
        *pair_by_user(
            candidate.per_user[gate.metric],
            candidate.user_keys,
            stable.per_user[gate.metric],
            stable.user_keys,
        )
    )
    paired = PairedComparison(
        users=pairs.users,
        mean_difference=round(pairs.mean_difference, 6),
        ci95_low=round(pairs.ci95_low, 6),
        ci95_high=round(pairs.ci95_high, 6),
    )
    numbers = (
        f"{gate.metric} {new:.4f} vs stable {stable_version} {old:.4f} ({change}; "
        f"needed >= {needed:.4f}, +{gate.min_relative_improvement:.1%}) on {candidate.users} "
        f"users; paired difference {pairs.mean_difference:+.4f} (95% CI "
        f"{pairs.ci95_low:+.4f} to {pairs.ci95_high:+.4f}) on {pairs.users} users"
    )
    if not (new > 0 and new >= needed):
        return Judgement(GateResult.GATED_OUT, numbers, improvement, paired)
    if pairs.ci95_low <= 0:
        return Judgement(
            GateResult.GATED_OUT,
            f"{numbers}: the paired interval reaches 0, the gain may be noise",
            improvement,
            paired,
        )
    return Judgement(GateResult.PASSED, numbers, improvement, paired)


def write_verdict(verdict: TrainingVerdict, model_store: str | Path | ModelStore) -> str:
    """Write the run's report into the history and as the latest; returns where the
    latest lies."""
    store = model_store if isinstance(model_store, ModelStore) else ModelStore(model_store)
    text = verdict.model_dump_json(by_alias=True, indent=2) + "\n"
    kept = training_report.report_file_name(verdict.model_name, verdict.candidate_version)
    store.write_text(f"{training_report.TRAINING_REPORTS_FOLDER}/{kept}", text)
    latest = training_report.latest_report_file_name(verdict.model_name)
    store.write_text(latest, text)
    return store.location(latest)


def read_verdict(model_store: str | Path | ModelStore, model_name: str) -> TrainingVerdict | None:
    """The latest run's verdict, if any run has reported."""
    store = model_store if isinstance(model_store, ModelStore) else ModelStore(model_store)
    text = store.read_text(training_report.latest_report_file_name(model_name))
    if text is None:
        return None
    return TrainingVerdict.model_validate_json(text)
