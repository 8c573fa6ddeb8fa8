"""The training run from the event log and its gate, on a small drifting synthetic world.

The stable model was trained on the world's first days; users' interests then drift.
A candidate trained on the recent window must pass the gate and be published; one
trained on a corrupted log (most item ids replaced at random, as a broken sink would
write) must be gated out, as must a window with too little data, and nothing of theirs
may reach the model store but the verdict.
"""

from __future__ import annotations

import json
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fsspec.core import url_to_fs
from s3_server import S3Server, moto_s3

from model_handlers.archive import ArchiveRequest, build_archive
from model_handlers.continuous_training import (
    Gate,
    TrainingRun,
    interactions_from_events,
    read_interactions,
    read_verdict,
    run_training,
)
from model_handlers.ease import EaseConfig
from model_handlers.interactions import Interactions
from model_handlers.model_directory import write_trained_model
from model_handlers.model_store import ModelStore
from model_handlers.synthetic import DAY_MS, SyntheticConfig, SyntheticWorld
from model_handlers.training import TrainingConfig, train_model
from recsys_contracts.index_spec import IndexSpec
from recsys_contracts.training_report import GateResult

from .event_log_files import write_event_log

NAME = "retrieval"
WORLD = SyntheticConfig(
    users=600, items=400, categories=8, sessions_per_user=6, days=30, drift=1.0, seed=3
)
TRAINING = TrainingConfig(
    ease=EaseConfig(rank=64, l2_grid=(50.0, 200.0, 800.0), half_life_grid=(5.0, 20.0, np.inf)),
    max_eval_users=300,
    threads=1,
)
STABLE_INDEX = IndexSpec(type="Flat")
GATE = Gate(metric="ndcg@10", min_relative_improvement=0.02, min_users=100, min_interactions=2000)


@pytest.fixture(scope="module")
def world_log() -> Interactions:
    return SyntheticWorld(WORLD).interactions()


def _days(log: Interactions, start: float, end: float) -> Interactions:
    t0 = WORLD.start_ms
    return log.select(
        (log.timestamp_ms >= t0 + start * DAY_MS) & (log.timestamp_ms < t0 + end * DAY_MS)
    )


@pytest.fixture(scope="module")
def stable_store(world_log: Interactions, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding version 1, trained on the first four days only."""
    root = tmp_path_factory.mktemp("stable")
    write_trained_model(train_model(_days(world_log, 0, 4), TRAINING), root / "model")
    build_archive(
        ArchiveRequest(
            model_dir=root / "model", out_dir=root / "store", name=NAME, version="1",
            index=STABLE_INDEX, top_k=20,
        )
    )  # fmt: skip
    return root / "store"


@pytest.fixture
def store(stable_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(stable_store, copy)
    return copy


@pytest.fixture(scope="module")
def clean_log(world_log: Interactions, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("log")
    write_event_log(root, world_log)
    return root


def _run(
    log_root: Path, store: Path, *, start: float = 20, end: float = 30, **changes: object
) -> TrainingRun:
    run = TrainingRun(
        log_uri=f"file://{log_root}",
        model_store=store,
        model_name=NAME,
        candidate_version="2",
        since_ms=WORLD.start_ms + int(start * DAY_MS),
        until_ms=WORLD.start_ms + int(end * DAY_MS),
        stable_version="1",
        gate=GATE,
        training=TRAINING,
    )
    return replace(run, **changes)  # type: ignore[arg-type]


def _pairs(log: Interactions) -> list[tuple[str, str]]:
    users, items = np.asarray(log.user_ids)[log.user], np.asarray(log.item_ids)[log.item]
    return sorted(zip(users.tolist(), items.tolist(), strict=True))


def _archives(store: Path) -> list[str]:
    return sorted(p.name for p in store.glob("*.mar"))


def test_the_reader_returns_the_window_once_per_event_without_impressions(
    world_log: Interactions, tmp_path: Path
) -> None:
    recent = _days(world_log, 20, 30)
    write_event_log(tmp_path, recent)
    write_event_log(tmp_path, recent.select(np.arange(100)))  # redelivered: same event ids
    write_event_log(tmp_path, recent, event_type="impression", first_event=10**6)
    since, until = WORLD.start_ms + 22 * DAY_MS, WORLD.start_ms + 25 * DAY_MS
    events = read_interactions(str(tmp_path), since, until)
    log = interactions_from_events(events)
    expected = _days(world_log, 22, 25)
    assert len(log) == len(expected)
    assert log.timestamp_ms.min() >= since and log.timestamp_ms.max() < until
    assert _pairs(log) == _pairs(expected)


def test_a_candidate_from_the_recent_window_beats_the_stale_stable_and_is_published(
    clean_log: Path, store: Path
) -> None:
    verdict = run_training(_run(clean_log, store))
    assert verdict.result is GateResult.PASSED, verdict.reason
    assert verdict.candidate is not None and verdict.stable is not None
    assert verdict.candidate.value >= verdict.stable.value * 1.02
    assert verdict.candidate.users == verdict.stable.users >= GATE.min_users
    # Better user by user, beyond noise: the paired interval lies above 0.
    assert verdict.paired is not None and verdict.paired.users == verdict.candidate.users
    assert 0 < verdict.paired.ci95_low < verdict.paired.mean_difference < verdict.paired.ci95_high
    assert verdict.archive == "retrieval-2.mar"
    assert _archives(store) == ["retrieval-1.mar", "retrieval-2.mar"]
    with zipfile.ZipFile(store / "retrieval-2.mar") as packed:
        manifest = json.loads(packed.read("manifest.json"))
    # Served like the stable: same index and largest k.
    assert manifest["index"]["type"] == "Flat" and manifest["top_k"] == 20
    assert manifest["model_version"] == "2"
    assert read_verdict(store, NAME) == verdict
    assert (store / "training" / "retrieval-2.json").is_file()


def test_a_candidate_from_a_corrupted_log_is_gated_out_and_nothing_is_published(
    world_log: Interactions, store: Path, tmp_path: Path
) -> None:
    recent = _days(world_log, 20, 30)
    rng = np.random.default_rng(0)
    items = recent.item.copy()
    broken = rng.random(len(items)) < 0.7
    items[broken] = rng.integers(0, recent.num_items, int(broken.sum()))
    write_event_log(tmp_path / "log", replace(recent, item=items.astype(np.int32)))
    verdict = run_training(_run(tmp_path / "log", store))
    assert verdict.result is GateResult.GATED_OUT, verdict.reason
    assert verdict.candidate is not None and verdict.stable is not None
    assert verdict.candidate.value < verdict.stable.value * 1.02
    assert "ndcg@10" in verdict.reason and verdict.archive is None
    assert _archives(store) == ["retrieval-1.mar"]
    assert read_verdict(store, NAME) == verdict


def test_the_same_candidate_is_gated_out_when_the_margin_asked_is_larger(
    clean_log: Path, store: Path
) -> None:
    verdict = run_training(_run(clean_log, store, gate=replace(GATE, min_relative_improvement=1.0)))
    assert verdict.result is GateResult.GATED_OUT
    assert verdict.relative_improvement is not None and 0 < verdict.relative_improvement < 1.0
    assert _archives(store) == ["retrieval-1.mar"]


def test_a_window_with_too_few_interactions_trains_nothing(clean_log: Path, store: Path) -> None:
    verdict = run_training(_run(clean_log, store, start=29.9, end=30))
    assert verdict.result is GateResult.GATED_OUT
    assert 0 < verdict.interactions < GATE.min_interactions
    assert verdict.candidate is None and "fewer than the 2000 needed" in verdict.reason
    assert _archives(store) == ["retrieval-1.mar"]


def test_a_slice_with_too_few_users_is_gated_out(clean_log: Path, store: Path) -> None:
    verdict = run_training(_run(clean_log, store, gate=replace(GATE, min_users=10_000)))
    assert verdict.result is GateResult.GATED_OUT
    assert verdict.candidate is not None and "users in the held-out slice" in verdict.reason
    assert verdict.stable is None  # judged before the stable was even scored
    assert _archives(store) == ["retrieval-1.mar"]


def test_a_missing_stable_archive_fails_the_run_without_publishing(
    clean_log: Path, store: Path
) -> None:
    verdict = run_training(_run(clean_log, store, stable_version="9"))
    assert verdict.result is GateResult.FAILED
    assert "retrieval-9.mar" in verdict.reason
    assert _archives(store) == ["retrieval-1.mar"]
    assert read_verdict(store, NAME) == verdict


def test_a_first_run_without_a_stable_publishes_on_the_data_minimums(
    clean_log: Path, tmp_path: Path
) -> None:
    verdict = run_training(_run(clean_log, tmp_path / "store", stable_version=None))
    assert verdict.result is GateResult.PASSED and verdict.stable is None
    assert _archives(tmp_path / "store") == ["retrieval-2.mar"]


def test_recsys_retrain_prints_the_verdict_and_fails_only_a_broken_run(
    clean_log: Path, store: Path
) -> None:
    from typer.testing import CliRunner

    from recsys_operator.cli import app

    until = str(WORLD.start_ms + 30 * DAY_MS)
    common = ["retrain", "--log", str(clean_log), "--model-store", str(store), "--until", until]
    common += ["--window", "10d", "--min-users", "100", "--threads", "1"]
    runner = CliRunner()
    passed = runner.invoke(app, [*common, "--stable-version", "1", "--min-improvement", "0.02"])
    assert passed.exit_code == 0, passed.output
    verdict = json.loads(passed.stdout.strip().splitlines()[-1])
    assert verdict["result"] == "Passed" and verdict["candidateVersion"] == "20260131-000000"
    assert (store / "retrieval-20260131-000000.mar").is_file()
    message = store.parent / "termination-log"
    failed = runner.invoke(
        app, [*common, "--stable-version", "9", "--version", "3", "--verdict-file", str(message)]
    )
    assert failed.exit_code == 1
    assert json.loads(failed.stdout.strip().splitlines()[-1])["result"] == "Failed"
    # What the operator reads from the pod: the same verdict, within the 4096-byte limit.
    latest = read_verdict(store, NAME)
    assert latest is not None and json.loads(message.read_text())["reason"] == latest.reason
    assert len(message.read_bytes()) < 4096
    assert not (store / "retrieval-3.mar").exists()


# --- S3: the log and the model store on a real S3-protocol server (moto) -------------


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_s3() as server:
        yield server


def _s3_copy(server: S3Server, folder: Path, uri: str) -> None:
    """Upload every file under `folder` to `uri`, keeping relative paths."""
    fs, root = url_to_fs(uri, **server.storage_options)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{root}/{path.relative_to(folder).as_posix()}")


def _s3_names(server: S3Server, uri: str) -> list[str]:
    fs, root = url_to_fs(uri, **server.storage_options)
    fs.invalidate_cache()
    return sorted(p[len(root) + 1 :] for p in fs.find(root))


def test_a_run_reads_the_stable_from_an_s3_store_and_publishes_the_candidate_there(
    s3: S3Server, clean_log: Path, stable_store: Path
) -> None:
    bucket = s3.new_bucket("store")
    log_uri, store_uri = f"s3://{bucket}/log", f"s3://{bucket}/models/retrieval"
    _s3_copy(s3, clean_log, log_uri)
    _s3_copy(s3, stable_store, store_uri)
    run = replace(
        _run(clean_log, stable_store),
        log_uri=log_uri,
        model_store=store_uri,
        storage_options=s3.storage_options,
    )
    verdict = run_training(run)
    assert verdict.result is GateResult.PASSED, verdict.reason
    assert verdict.interactions > GATE.min_interactions and verdict.archive == "retrieval-2.mar"
    assert _s3_names(s3, store_uri) == [
        "retrieval-1.mar",
        "retrieval-2.mar",
        "retrieval.training.json",
        "training/retrieval-2.json",
    ]
    assert read_verdict(ModelStore(store_uri, s3.storage_options), NAME) == verdict
    # The published archive is whole and is the candidate version.
    fs, root = url_to_fs(store_uri, **s3.storage_options)
    with fs.open(f"{root}/retrieval-2.mar", "rb") as raw, zipfile.ZipFile(raw) as packed:
        assert json.loads(packed.read("manifest.json"))["model_version"] == "2"


def test_recsys_retrain_on_s3_with_the_pods_environment_publishes_nothing_when_gated_out(
    s3: S3Server, clean_log: Path, stable_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from recsys_operator.cli import app

    bucket = s3.new_bucket("cli")
    log_uri, store_uri = f"s3://{bucket}/log", f"s3://{bucket}/models"
    _s3_copy(s3, clean_log, log_uri)
    _s3_copy(s3, stable_store, store_uri)
    for key, value in s3.env.items():  # what a pod has: botocore's environment
        monkeypatch.setenv(key, value)
    until = str(WORLD.start_ms + 30 * DAY_MS)
    args = ["retrain", "--log", log_uri, "--model-store", store_uri, "--until", until]
    args += ["--window", "10d", "--min-users", "100", "--threads", "1", "--version", "9"]
    args += ["--stable-version", "1", "--min-improvement", "5.0"]  # asks for +500%
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    verdict = json.loads(done.stdout.strip().splitlines()[-1])
    assert verdict["result"] == "GatedOut" and verdict["stable"]["version"] == "1"
    assert _s3_names(s3, store_uri) == [
        "retrieval-1.mar",
        "retrieval.training.json",
        "training/retrieval-9.json",
    ]


def test_a_store_that_cannot_be_written_fails_the_run_and_the_verdict_says_so(
    s3: S3Server, clean_log: Path, stable_store: Path
) -> None:
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/models"
    run = replace(
        _run(clean_log, stable_store), model_store=missing, storage_options=s3.storage_options
    )
    verdict = run_training(run)  # returned, not raised: stdout and the pod still get it
    assert verdict.result is GateResult.FAILED
    assert "retrieval-1.mar" in verdict.reason
    assert "could not be written to the model store" in verdict.reason
    assert len(verdict.model_dump_json(by_alias=True)) < 4096


@pytest.mark.parametrize(
    ("option", "value", "refusal"),
    [
        (
            "--until",
            "yesterday",
            "--until 'yesterday': give RFC 3339 (2026-12-01T00:00:00Z) or epoch ms",
        ),
        ("--window", "7 days", "--window '7 days': '7 days' is not a duration"),
    ],
)
def test_recsys_retrain_names_the_option_it_cannot_read(
    option: str, value: str, refusal: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from recsys_operator.cli import app

    args = ["retrain", "--log", str(tmp_path / "log"), "--model-store", str(tmp_path / "store")]
    done = CliRunner().invoke(app, [*args, option, value])
    assert done.exit_code == 1, done.output
    assert refusal in done.output
    assert not (tmp_path / "store").exists()  # refused before any run
