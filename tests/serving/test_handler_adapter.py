"""The TorchServe adapter with a stand-in for TorchServe's context: per-request
statuses in a batch, content types, metrics, and settings from the environment."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from model_handlers.handler_settings import ENVIRONMENT_VARIABLES, HandlerSettings, SettingsError
from model_handlers.model_directory import read_manifest
from model_handlers.session_rerank import SessionStage
from model_handlers.torchserve_handler import RetrievalHandler
from recsys_contracts import handler_metrics
from recsys_contracts.archive_layout import ArchiveManifest

from .reference import BruteForce


class RecordedMetric:
    def __init__(self, name: str, log: list[tuple[str, float, list[str]]]) -> None:
        self.name, self.log = name, log

    def add_or_update(
        self, value: float, dimension_values: list[str], request_id: str = ""
    ) -> None:
        self.log.append((self.name, value, dimension_values))


class Metrics:
    def __init__(self) -> None:
        self.log: list[tuple[str, float, list[str]]] = []

    def get_metric(self, name: str, kind: Any) -> RecordedMetric:
        return RecordedMetric(name, self.log)


class Context:
    """What the handler uses of ts.context.Context."""

    def __init__(
        self, model_dir: Path, metrics: Metrics, content_type: str = "application/json"
    ) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.metrics = metrics  # TorchServe keeps one metrics cache per worker
        self.statuses: dict[int, tuple[int, str]] = {}
        self.content_types: dict[int, str] = {}
        self.request_content_type = content_type
        self.headers: dict[int, dict[str, str]] = {}  # HTTP headers per request of the batch

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return self.headers.get(idx, {})

    def get_request_header(self, idx: int, key: str) -> dict[str, str]:
        return {"content-type": self.request_content_type}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def handler(
    unpacked: dict[str, Path], metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> RetrievalHandler:
    for name in ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    h = RetrievalHandler()
    h.initialize(Context(unpacked["1"], metrics))
    return h


def test_each_request_of_a_batch_gets_its_own_status(
    handler: RetrievalHandler,
    metrics: Metrics,
    unpacked: dict[str, Path],
    brute_force: dict[str, BruteForce],
) -> None:
    user = sorted(brute_force["1"].users)[0]
    batch = [
        {"body": {"user_id": user, "k": 3}},
        {"body": bytearray(b'{"k": ')},  # TorchServe hands over bytes when JSON parsing failed
        {"body": {"k": 0}},
        {"data": {"user_id": "nobody", "k": 2}},
    ]
    context = Context(unpacked["1"], metrics)
    answers = [json.loads(a) for a in handler.handle(batch, context)]
    assert answers[0]["item_ids"] == brute_force["1"].answer(user, k=3)
    assert answers[3]["item_ids"] == brute_force["1"].popular[:2]
    assert set(context.statuses) == {1, 2}
    assert context.statuses[1][0] == 400 and "not valid JSON" in context.statuses[1][1]
    assert context.statuses[2] == (400, "k must be between 1 and 50, got 0")
    assert answers[2] == {
        "error": "k must be between 1 and 50, got 0",
        "status": 400,
        "model_version": "1",
    }
    assert all(a["model_version"] == "1" for a in answers)
    assert context.content_types == dict.fromkeys(range(4), "application/json")


def test_requests_past_their_deadline_are_answered_504_without_being_computed(
    handler: RetrievalHandler,
    metrics: Metrics,
    unpacked: dict[str, Path],
    brute_force: dict[str, BruteForce],
) -> None:
    user = sorted(brute_force["1"].users)[0]
    now_ms = int(time.time() * 1000)
    batch = [{"body": {"user_id": user, "k": 3}} for _ in range(4)]
    context = Context(unpacked["1"], metrics)
    context.headers = {
        0: {"X-Recsys-Deadline-Ms": str(now_ms - 1)},  # the gateway gave up on it
        1: {"x-recsys-deadline-ms": str(now_ms + 60_000)},  # still awaited (any case)
        2: {"X-Recsys-Deadline-Ms": "soon"},  # garbled: served, never refused
        # 3: no header (an older gateway): served
    }
    answers = [json.loads(a) for a in handler.handle(batch, context)]
    assert context.statuses == {0: (504, "deadline passed")}
    assert answers[0]["status"] == 504 and "deadline" in answers[0]["error"]
    assert "item_ids" not in answers[0]
    for served in answers[1:]:
        assert served["item_ids"] == brute_force["1"].answer(user, k=3)
    assert handler.expired_skipped == 1
    emitted = {name: value for name, value, _ in metrics.log}
    assert handler_metrics.BAD_REQUESTS.name not in emitted  # skipped is not refused


def test_metrics_carry_the_model_version(
    handler: RetrievalHandler, metrics: Metrics, unpacked: dict[str, Path]
) -> None:
    batch = [{"body": {"user_id": "nobody", "k": 2}}, {"body": {"k": -1}}]
    handler.handle(batch, Context(unpacked["1"], metrics))
    emitted = {name: (value, dims) for name, value, dims in metrics.log}
    assert emitted[handler_metrics.BATCH_SIZE.name] == (2, ["retrieval", "1"])
    assert emitted[handler_metrics.BAD_REQUESTS.name][0] == 1
    assert emitted[handler_metrics.COLD_STARTS.name][0] == 1
    # One line each: latency, search, size, and three counters (bad, cold, cache miss).
    assert len(metrics.log) == len(emitted) == 6
    assert emitted[handler_metrics.CACHE_MISSES.name][0] == 1
    assert emitted[handler_metrics.HANDLER_LATENCY.name][0] > 0
    assert handler_metrics.STORE_MISSES.name not in emitted  # no store configured


def test_a_json_string_body_is_not_parsed_twice(
    handler: RetrievalHandler, metrics: Metrics, unpacked: dict[str, Path]
) -> None:
    batch = [{"body": '{"k": 3}'}]  # the client sent the JSON string "{\"k\": 3}"
    context = Context(unpacked["1"], metrics)
    handler.handle(batch, context)
    assert context.statuses[0][0] == 400 and "JSON object" in context.statuses[0][1]
    plain = Context(unpacked["1"], metrics, content_type="text/plain")
    handler.handle(batch, plain)
    assert plain.statuses == {}


@pytest.fixture
def manifest(unpacked: dict[str, Path]) -> ArchiveManifest:
    return read_manifest(unpacked["1"])


def test_settings_come_from_the_environment_then_the_archive(manifest: ArchiveManifest) -> None:
    defaults = HandlerSettings.resolve({}, manifest)
    assert (
        defaults.redis_url is None and defaults.max_k == manifest.top_k and defaults.use_gpu is None
    )
    env = {
        "RECSYS_REDIS_URL": "redis://127.0.0.1:1/0",
        "RECSYS_SYSTEM_ID": "ns.name",
        "RECSYS_STORE_TIMEOUT_MS": "20",
        "RECSYS_MAX_K": "7",
        "RECSYS_QUANTIZE_TOWER": "true",
        "RECSYS_FAISS_DEVICE": "cpu",
        "RECSYS_MODEL_VERSION": "1",
        "RECSYS_REDIS_MODE": "cluster",
    }
    settings = HandlerSettings.resolve(env, manifest)
    assert defaults.redis_mode == "single" and settings.redis_mode == "cluster"
    assert (settings.redis_url, settings.system_id, settings.store_timeout_s) == (
        "redis://127.0.0.1:1/0",
        "ns.name",
        0.02,
    )
    assert settings.max_k == 7 and settings.quantize_tower and settings.use_gpu is False


def test_the_session_stage_is_on_by_default_and_set_by_the_environment(
    manifest: ArchiveManifest,
) -> None:
    assert HandlerSettings.resolve({}, manifest).session is None  # the model's default
    assert SessionStage().enabled
    one = HandlerSettings.resolve({"RECSYS_SESSION_ITEMS": "2"}, manifest).session
    assert one == SessionStage(items=2)  # the others keep their defaults
    env = {
        "RECSYS_SESSION_WEIGHT": "0.5",
        "RECSYS_SESSION_ITEMS": "3",
        "RECSYS_SESSION_DECAY": "1",
        "RECSYS_SESSION_POPULARITY_WEIGHT": "0",
        "RECSYS_SESSION_CANDIDATES": "40",
    }
    assert HandlerSettings.resolve(env, manifest).session == SessionStage(
        weight=0.5, items=3, decay=1.0, popularity_weight=0.0, candidates=40
    )
    off = HandlerSettings.resolve({"RECSYS_SESSION_WEIGHT": "0"}, manifest).session
    assert off is not None and not off.enabled


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RECSYS_REDIS_URL": "redis://x:1/0"}, "RECSYS_SYSTEM_ID is required"),
        ({"RECSYS_MAX_K": "lots"}, "RECSYS_MAX_K must be a number"),
        ({"RECSYS_MAX_K": "999999"}, "catalogue size 2000"),
        ({"RECSYS_QUANTIZE_TOWER": "maybe"}, "true or false"),
        ({"RECSYS_FAISS_DEVICE": "tpu"}, "auto, cpu or gpu"),
        ({"RECSYS_STORE_TIMEOUT_MS": "0"}, "must be positive"),
        ({"RECSYS_MODEL_VERSION": "2"}, "archive holds version 1"),
        ({"RECSYS_REDIS_MODE": "sharded"}, "single or cluster"),
        (
            {
                "RECSYS_REDIS_URL": "redis://x:1/3",
                "RECSYS_SYSTEM_ID": "a.b",
                "RECSYS_REDIS_MODE": "cluster",
            },
            "database 0 only",
        ),
        ({"RECSYS_CACHE_MAX_ENTRIES": "-1"}, "RECSYS_CACHE_MAX_ENTRIES must be a whole number"),
        ({"RECSYS_CACHE_MAX_ENTRIES": "2.5"}, "RECSYS_CACHE_MAX_ENTRIES must be a whole number"),
        ({"RECSYS_CACHE_TTL_MS": "0"}, "RECSYS_CACHE_TTL_MS must be positive"),
        ({"RECSYS_SESSION_WEIGHT": "-1"}, "RECSYS_SESSION_WEIGHT must be 0 or more"),
        ({"RECSYS_SESSION_ITEMS": "2.5"}, "RECSYS_SESSION_ITEMS must be a whole number"),
        ({"RECSYS_SESSION_DECAY": "0"}, r"RECSYS_SESSION_DECAY must lie in \(0, 1\]"),
        ({"RECSYS_SESSION_POPULARITY_WEIGHT": "x"}, "RECSYS_SESSION_POPULARITY_WEIGHT must be a"),
        ({"RECSYS_SESSION_CANDIDATES": "0"}, "RECSYS_SESSION_CANDIDATES must be a whole number"),
    ],
)
def test_bad_settings_stop_the_model_from_loading(
    manifest: ArchiveManifest, env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        HandlerSettings.resolve(env, manifest)
