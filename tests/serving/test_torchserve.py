"""The handler in a real TorchServe (Java 17) with a real Redis, configured by exactly
the files the operator renders. One server for the whole module, serving versions 1
and 2 of one model side by side."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from recsys_contracts.feature_keys import (
    LAYOUT_VERSION,
    embedding_field,
    encode_embedding,
    encode_recent,
    user_key,
)
from recsys_contracts.retrieval_request import DEADLINE_HEADER
from recsys_operator.api.recommender_system import ModelSpec, ServingSpec
from recsys_operator.launchers.process import ManagedProcess
from recsys_operator.launchers.torchserve import LocalTorchServe, torchserve_server

from .conftest import MODEL_NAME, TOP_K
from .reference import BruteForce

pytestmark = [pytest.mark.java, pytest.mark.redis, pytest.mark.xdist_group("torchserve")]

SYSTEM = "test-ns.serving"
MAX_BATCH_SIZE = 8


@pytest.fixture(scope="module")
def server(
    model_store: Path, redis_server: ManagedProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalTorchServe]:
    model = ModelSpec(name=MODEL_NAME, version="1", embedding_dim=16, top_k=TOP_K)
    serving = ServingSpec(
        workers=1,
        batching={"maxBatchSize": MAX_BATCH_SIZE, "maxBatchDelayMs": 20},
        responseTimeoutS=20,
        resources={"limits": {"memory": "2Gi"}},
    )
    ts = torchserve_server(
        tmp_path_factory.mktemp("torchserve"),
        model=model,
        serving=serving,
        model_store=model_store,
        versions=["1", "2"],
        env={
            "RECSYS_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/0",
            "RECSYS_SYSTEM_ID": SYSTEM,
        },
    )
    ts.start(timeout=180)
    yield ts
    ts.stop()


@pytest.fixture
def store(redis_server: ManagedProcess) -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    yield client
    for key in client.scan_iter(f"recsys:{LAYOUT_VERSION}:{SYSTEM}:*"):
        client.delete(key)
    client.close()


def post(
    server: LocalTorchServe,
    body: Any,
    version: str | None = None,
    timeout: float = 30,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        server.predictions_url(version),
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def known_users(brute_force: dict[str, BruteForce], count: int, seed: int = 0) -> list[str]:
    users = sorted(brute_force["1"].users)
    return list(np.random.default_rng(seed).choice(users, count, replace=False))


def test_predictions_equal_brute_force_search(
    server: LocalTorchServe, brute_force: dict[str, BruteForce]
) -> None:
    truth = brute_force["1"]
    rng = np.random.default_rng(1)
    for n, user in enumerate(known_users(brute_force, 12)):
        k = int(rng.integers(1, TOP_K + 1))
        recent = list(rng.choice(truth.items, size=n % 4, replace=False))
        status, body = post(server, {"user_id": user, "k": k, "recent_item_ids": recent}, "1")
        assert status == 200, body
        expected_items, expected_scores = truth.ranked(user, recent, k, recent)
        assert body["item_ids"] == expected_items
        np.testing.assert_allclose(body["scores"], expected_scores, rtol=1e-4, atol=1e-5)
        assert body["model_version"] == "1"


def test_excluded_and_recent_items_are_never_returned(
    server: LocalTorchServe, brute_force: dict[str, BruteForce]
) -> None:
    truth = brute_force["1"]
    for user in known_users(brute_force, 8, seed=2):
        # Exclude exactly the items the user would otherwise get first.
        favourites = truth.answer(user, k=30)
        status, body = post(server, {"user_id": user, "k": 20, "exclude_item_ids": favourites}, "1")
        assert status == 200, body
        assert len(body["item_ids"]) == 20
        assert not set(body["item_ids"]) & set(favourites)
        assert body["item_ids"] == truth.answer(user, k=20, exclude=favourites)
    for version in ("1", "2"):
        status, body = post(
            server, {"user_id": "u001", "k": 10, "recent_item_ids": favourites[:5]}, version
        )
        assert status == 200 and not set(body["item_ids"]) & set(favourites[:5])


def test_unknown_user_gets_the_most_popular_items(
    server: LocalTorchServe, brute_force: dict[str, BruteForce]
) -> None:
    popular = brute_force["1"].popular
    status, body = post(server, {"user_id": "someone-new", "k": 10}, "1")
    assert status == 200, body
    assert body["item_ids"] == popular[:10]
    status, body = post(server, {"k": 5, "exclude_item_ids": popular[:3]}, "1")
    assert status == 200 and body["item_ids"] == popular[3:8]
    # An unknown user with recent items is embedded from them instead.
    recent = popular[10:13]
    status, body = post(server, {"user_id": "someone-new", "k": 10, "recent_item_ids": recent}, "1")
    assert status == 200 and body["item_ids"] == brute_force["1"].answer(
        "someone-new", k=10, recent=recent
    )


def test_online_features_from_redis_are_used_when_present(
    server: LocalTorchServe, brute_force: dict[str, BruteForce], store: redis.Redis
) -> None:
    truth = brute_force["1"]
    user = known_users(brute_force, 1, seed=3)[0]
    _, before = post(server, {"user_id": user, "k": 10}, "1")
    assert before["item_ids"] == truth.answer(user, k=10)

    # Recent items written by the stream job (newest first) replace the request's.
    recent = [truth.items[i] for i in (5, 50, 500)]
    store.hset(user_key(SYSTEM, user), "recent", encode_recent(recent))
    _, with_recent = post(server, {"user_id": user, "k": 10, "recent_item_ids": ["i0001"]}, "1")
    assert with_recent["item_ids"] == truth.answer(user, k=10, recent=recent)
    assert with_recent["item_ids"] != before["item_ids"]

    # The tower, knowing the user and fed the fresh recent items, comes before the
    # online embedding (it measured better); the embedding serves users it cannot embed.
    target = truth.embeddings[1234]
    store.hset(user_key(SYSTEM, user), embedding_field("1"), encode_embedding(target))
    _, with_embedding = post(server, {"user_id": user, "k": 10}, "1")
    assert with_embedding["item_ids"] == with_recent["item_ids"]
    stranger = "not-in-training"
    store.hset(user_key(SYSTEM, stranger), embedding_field("1"), encode_embedding(target))
    _, from_embedding = post(server, {"user_id": stranger, "k": 10}, "1")
    expected, _ = truth.top_k(target, 10, [])
    assert from_embedding["item_ids"] == expected
    assert from_embedding["item_ids"][0] == truth.items[1234]
    # ...but only for that version: version 2 reads its own key, which is absent.
    _, other_version = post(server, {"user_id": stranger, "k": 10}, "2")
    assert other_version["item_ids"] == truth.popular[:10]


def test_a_request_past_the_gateways_deadline_is_answered_504_uncomputed(
    server: LocalTorchServe,
) -> None:
    now_ms = int(time.time() * 1000)
    status, answer = post(server, {"k": 3}, "1", headers={DEADLINE_HEADER: str(now_ms - 1000)})
    assert status == 504 and "deadline" in answer["error"] and "item_ids" not in answer
    status, answer = post(server, {"k": 3}, "1", headers={DEADLINE_HEADER: str(now_ms + 60_000)})
    assert status == 200 and len(answer["item_ids"]) == 3


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"user_id": "u001", "k": ', "not valid JSON"),
        (b"", "no body"),
        ([1, 2, 3], "JSON object"),
        ("just text", "JSON object"),
        ({"user_id": 42}, "user_id"),
        ({"k": "10"}, "k must be an integer"),
        ({"k": True}, "k must be an integer"),
        ({"k": 0}, "between 1 and 50"),
        ({"k": -3}, "between 1 and 50"),
        ({"k": TOP_K + 1}, "between 1 and 50"),
        ({"recent_item_ids": "i0001"}, "recent_item_ids must be a list"),
        ({"exclude_item_ids": [1, 2]}, "exclude_item_ids[0]"),
        ({"userId": "u001"}, "unknown field"),
    ],
)
def test_bad_requests_get_400_with_a_reason(
    server: LocalTorchServe, body: Any, reason: str
) -> None:
    status, answer = post(server, body, "1")
    assert status == 400
    assert reason in answer["error"]
    assert answer["model_version"] == "1"


def test_a_batch_mixing_good_and_bad_requests_answers_each_on_its_own(
    server: LocalTorchServe, brute_force: dict[str, BruteForce]
) -> None:
    users = known_users(brute_force, MAX_BATCH_SIZE // 2, seed=4)
    bodies: list[Any] = []
    for user in users:
        bodies += [{"user_id": user, "k": 5}, {"user_id": user, "k": 0}]

    def burst() -> list[tuple[int, dict[str, Any]]]:
        results: list[tuple[int, dict[str, Any]]] = [(0, {})] * len(bodies)
        barrier = threading.Barrier(len(bodies))

        def send(n: int) -> None:
            barrier.wait()
            results[n] = post(server, bodies[n], "1")

        threads = [threading.Thread(target=send, args=(n,)) for n in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    batched = False
    deadline = time.monotonic() + 60
    while not batched and time.monotonic() < deadline:
        before = _handler_counts(server)
        results = burst()
        after = _handler_counts(server)
        for (status, answer), body in zip(results, bodies, strict=True):
            if body["k"] == 0:
                assert status == 400 and "between 1 and" in answer["error"]
            else:
                assert status == 200 and answer["item_ids"] == brute_force["1"].answer(
                    body["user_id"], k=5
                )
        # Fewer batches than requests: some batch held several requests.
        batched = after["batches"] - before["batches"] < after["requests"] - before["requests"]
    assert batched, "TorchServe never put two requests into one batch"


def _handler_counts(server: LocalTorchServe) -> dict[str, float]:
    metrics = _metrics(server)
    return {
        "batches": _sample(metrics, "recsys_handler_batch_size_count", "1"),
        "requests": _sample(metrics, "recsys_handler_batch_size_sum", "1"),
    }


def _metrics(server: LocalTorchServe) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        return str(response.read().decode())


def _sample(metrics: str, name: str, version: str) -> float:
    pattern = rf'^{name}\{{[^}}]*model_version="{version}"[^}}]*\}} ([0-9.eE+-]+)$'
    values = [float(m.group(1)) for m in re.finditer(pattern, metrics, re.MULTILINE)]
    return sum(values)


def test_versions_are_served_side_by_side_with_different_answers(
    server: LocalTorchServe, brute_force: dict[str, BruteForce], unpacked: dict[str, Path]
) -> None:
    from model_handlers.retriever import Retriever
    from recsys_contracts.retrieval_request import RetrievalRequest

    hnsw = Retriever.load(unpacked["2"])  # the same index file TorchServe loaded
    differs, overlap = 0, 0
    users = known_users(brute_force, 10, seed=5)
    for user in users:
        _, one = post(server, {"user_id": user, "k": 10}, "1")
        _, two = post(server, {"user_id": user, "k": 10}, "2")
        assert one["model_version"] == "1" and two["model_version"] == "2"
        assert one["item_ids"] == brute_force["1"].answer(user, k=10)
        # Version 2 is served exactly as its own archive's index answers...
        local = hnsw.recommend([RetrievalRequest(user, (), 10, ())]).recommendations[0]
        assert two["item_ids"] == local.item_ids
        overlap += len(set(two["item_ids"]) & set(brute_force["2"].answer(user, k=10)))
        differs += one["item_ids"] != two["item_ids"]
    # ...which is, over users, nearly the exact answer of its model (HNSW is approximate,
    # and its graph is built by several threads, so one user may fare worse than others).
    assert overlap >= 0.8 * 10 * len(users)
    assert differs >= 8
    # Without a version, the default version (1) answers.
    _, default = post(server, {"user_id": "u001", "k": 3})
    assert default["model_version"] == "1"


def test_handler_metrics_are_exported_per_model_version(server: LocalTorchServe) -> None:
    for version in ("1", "2"):
        post(server, {"user_id": "nobody", "k": 3}, version)
        post(server, {"k": 0}, version)
    metrics = _metrics(server)
    for version in ("1", "2"):
        for name in (
            "recsys_handler_latency_ms_count",
            "recsys_search_latency_ms_count",
            "recsys_store_latency_ms_count",
            "recsys_handler_batch_size_sum",
            "recsys_handler_bad_requests_total",
            "recsys_cold_starts_total",
            "recsys_store_misses_total",
        ):
            assert _sample(metrics, name, version) >= 1, f"{name} for version {version}"
    assert re.search(
        r'recsys_handler_latency_ms_bucket\{model_name="retrieval",model_version="1"', metrics
    )


def test_a_crashed_worker_is_replaced_and_serving_goes_on(server: LocalTorchServe) -> None:
    (old_pid,) = server.worker_pids("2")
    os.kill(old_pid, signal.SIGKILL)  # a worker of the TorchServe this module started
    deadline = time.monotonic() + 90
    new_pids: list[int] = []
    status, body = 0, {}
    while time.monotonic() < deadline:
        # TorchServe 0.12 can strand a request that arrives while the worker is dead: it
        # is answered only when the next one comes. Clients (the gateway) time out and
        # retry or fall back; so does this loop.
        try:
            status, body = post(server, {"user_id": "u001", "k": 5}, "2", timeout=5)
        except TimeoutError:
            status, body = 0, {}
        new_pids = server.worker_pids("2")
        if status == 200 and new_pids and old_pid not in new_pids:
            break
        time.sleep(0.25)
    assert new_pids and old_pid not in new_pids, f"worker not replaced: {new_pids}"
    assert status == 200 and len(body["item_ids"]) == 5
    # The other version never noticed.
    assert post(server, {"user_id": "u001", "k": 5}, "1")[0] == 200
