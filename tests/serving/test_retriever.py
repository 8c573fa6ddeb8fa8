"""The runtime-independent retrieval core, in-process, against brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_handlers.item_index import ItemIndex, build_index
from model_handlers.model_directory import (
    read_item_embeddings,
    read_item_ids,
    read_popularity,
    read_user_ids,
)
from model_handlers.online_features import OnlineFeatures
from model_handlers.retriever import Retriever, Source
from model_handlers.two_tower import load_user_tower
from recsys_contracts.retrieval_request import RetrievalRequest
from recsys_operator.api.recommender_system import IndexSpec

from .reference import BruteForce


def request(
    user: str | None = None,
    k: int = 10,
    recent: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> RetrievalRequest:
    return RetrievalRequest(user_id=user, recent_item_ids=recent, k=k, exclude_item_ids=exclude)


@pytest.fixture(scope="module")
def exact(unpacked: dict[str, Path]) -> Retriever:
    return Retriever.load(unpacked["1"])


def test_a_batch_equals_brute_force_request_by_request(
    exact: Retriever, brute_force: dict[str, BruteForce]
) -> None:
    truth = brute_force["1"]
    rng = np.random.default_rng(0)
    users = list(rng.choice(sorted(truth.users), 16, replace=False))
    requests = [
        request(
            users[n] if n % 4 else f"stranger-{n}",
            k=int(rng.integers(1, 51)),
            recent=tuple(rng.choice(truth.items, n % 5, replace=False)),
            exclude=tuple(rng.choice(truth.items, n % 3, replace=False)),
        )
        for n in range(16)
    ]
    batch = exact.recommend(requests)
    assert len(batch.recommendations) == len(requests)
    for r, got in zip(requests, batch.recommendations, strict=True):
        expected = truth.answer(
            r.user_id, k=r.k, recent=r.recent_item_ids, exclude=r.exclude_item_ids
        )
        assert got.item_ids == expected
        assert got.model_version == "1" and len(got.scores) == r.k
        assert got.scores == sorted(got.scores, reverse=True)
    assert batch.search_ms >= 0 and batch.tower_ms >= 0


def test_sources_in_order_of_preference(
    exact: Retriever, brute_force: dict[str, BruteForce]
) -> None:
    truth = brute_force["1"]
    user = sorted(truth.users)[3]
    store_recent = (truth.items[10], truth.items[20])
    vector = truth.embeddings[42] * 3.0  # the stream job need not normalise
    requests = [request(user, recent=("i0001",))] * 3 + [
        request("stranger"),
        request(None),
        request("stranger"),
    ]
    online = [
        # The tower wins whenever it knows the user or their recent items.
        OnlineFeatures(recent_item_ids=store_recent, embedding=vector),
        OnlineFeatures(recent_item_ids=store_recent),
        OnlineFeatures(),
        # An unknown user without known recent items: the online embedding.
        OnlineFeatures(embedding=vector),
        OnlineFeatures(),
        OnlineFeatures(embedding=np.zeros(7, dtype=np.float32)),  # wrong dimension: ignored
    ]
    got = exact.recommend(requests, online).recommendations
    assert [g.source for g in got] == [
        Source.USER_TOWER,
        Source.USER_TOWER,
        Source.USER_TOWER,
        Source.ONLINE_EMBEDDING,
        Source.POPULARITY,
        Source.POPULARITY,
    ]
    blocked = [*store_recent, "i0001"]
    assert got[0].item_ids == got[1].item_ids
    assert got[1].item_ids == truth.ranked(user, store_recent, 10, blocked)[0]
    assert got[2].item_ids == truth.answer(user, k=10, recent=("i0001",))
    assert got[3].item_ids == truth.top_k(vector, 10, [])[0]
    assert got[3].item_ids[0] == truth.items[42] and got[3].scores[0] == pytest.approx(
        1.0, abs=1e-5
    )
    assert got[4].item_ids == got[5].item_ids == truth.popular[:10]


def test_a_heavy_users_whole_history_from_the_store_is_never_recommended(
    exact: Retriever, brute_force: dict[str, BruteForce]
) -> None:
    truth = brute_force["1"]
    user = sorted(truth.users)[5]
    before = exact.recommend([request(user, k=20)]).recommendations[0].item_ids
    seen = frozenset(before[:15])  # beyond any recent list: only the store's seen set has them
    after = exact.recommend([request(user, k=20)], [OnlineFeatures(seen_item_ids=seen)])
    got = after.recommendations[0].item_ids
    assert len(got) == 20 and not seen & set(got)
    assert got[:5] == before[15:]  # the rest keep their order


def test_hnsw_version_finds_nearly_the_exact_answer(
    unpacked: dict[str, Path], brute_force: dict[str, BruteForce]
) -> None:
    approximate = Retriever.load(unpacked["2"])
    truth = brute_force["2"]
    overlaps = []
    for user in sorted(truth.users)[:40]:
        got = approximate.recommend([request(user, k=10)]).recommendations[0].item_ids
        overlaps.append(len(set(got) & set(truth.answer(user, k=10))) / 10)
    assert np.mean(overlaps) >= 0.9


def test_rows_that_come_up_short_are_searched_again(
    unpacked: dict[str, Path], brute_force: dict[str, BruteForce]
) -> None:
    """IVF-PQ probing one list of 64 holds few items; blocked items make it shorter."""
    directory = unpacked["1"]
    ivfpq = IndexSpec.model_validate(
        {"type": "IVF-PQ", "ivfpq": {"nlist": 64, "m": 4, "nbits": 8, "nprobe": 1}}
    )
    index = ItemIndex(build_index(read_item_embeddings(directory), ivfpq), ivfpq)
    retriever = Retriever(
        model_name="retrieval",
        model_version="x",
        user_tower=load_user_tower(directory),
        history_length=10,
        user_ids=read_user_ids(directory),
        item_ids=read_item_ids(directory),
        index=index,
        popularity=read_popularity(directory),
        max_k=50,
    )
    truth = brute_force["1"]
    user = sorted(truth.users)[0]
    exclude = tuple(truth.answer(user, k=40))
    got = retriever.recommend([request(user, k=50, exclude=exclude)]).recommendations[0]
    assert len(got.item_ids) == 50 and len(set(got.item_ids)) == 50
    assert not set(got.item_ids) & set(exclude)


def test_the_int8_tower_gives_nearly_the_same_answers(
    unpacked: dict[str, Path], exact: Retriever, brute_force: dict[str, BruteForce]
) -> None:
    quantized = Retriever.load(unpacked["1"], quantize_tower=True)
    users = sorted(brute_force["1"].users)[:40]
    requests = [request(u, k=10) for u in users]
    full = exact.recommend(requests).recommendations
    small = quantized.recommend(requests).recommendations
    overlap = np.mean(
        [len(set(a.item_ids) & set(b.item_ids)) / 10 for a, b in zip(full, small, strict=True)]
    )
    assert overlap >= 0.8
