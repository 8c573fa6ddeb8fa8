"""The session stage: a user's fresh recent items steer the tower's answer (in-process)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from model_handlers.model_directory import Popularity
from model_handlers.online_features import OnlineFeatures
from model_handlers.retriever import Retriever, Source, default_session_stage
from model_handlers.session_rerank import SESSION_OFF, SessionStage
from model_handlers.synthetic import SyntheticWorld
from model_handlers.two_tower import TowerConfig, make_user_tower
from recsys_contracts.retrieval_request import RetrievalRequest

from .reference import BruteForce


def request(user: str | None, k: int = 10) -> RetrievalRequest:
    return RetrievalRequest(user_id=user, recent_item_ids=(), k=k, exclude_item_ids=())


@pytest.fixture(scope="module")
def with_session(unpacked: dict[str, Path]) -> Retriever:
    return Retriever.load(unpacked["1"], use_gpu=False)


@pytest.fixture(scope="module")
def without_session(unpacked: dict[str, Path]) -> Retriever:
    return Retriever.load(unpacked["1"], use_gpu=False, session=SESSION_OFF)


def category_of(world: SyntheticWorld, item_ids: list[str]) -> list[int]:
    return [int(world.item_category[world.item_index(i)]) for i in item_ids]


def test_the_default_stage_equals_an_independent_reference(
    with_session: Retriever, brute_force: dict[str, BruteForce]
) -> None:
    truth = brute_force["1"]
    rng = np.random.default_rng(4)
    users = list(rng.choice(sorted(truth.users), 12, replace=False))
    for n, user in enumerate(users):
        recent = tuple(rng.choice(truth.items, 1 + n % 6, replace=False))
        got = with_session.recommend([request(user, k=5 + n)], [OnlineFeatures(recent)])
        answer = got.recommendations[0]
        items, scores = truth.ranked(user, recent, 5 + n, recent)
        assert answer.source is Source.USER_TOWER
        assert answer.item_ids == items
        np.testing.assert_allclose(answer.scores, scores, rtol=1e-4, atol=1e-5)


def test_a_user_who_just_viewed_a_category_gets_more_of_it(
    with_session: Retriever,
    without_session: Retriever,
    brute_force: dict[str, BruteForce],
    tiny_world: SyntheticWorld,
) -> None:
    truth = brute_force["1"]
    more, total_with, total_without = 0, 0, 0
    users = sorted(truth.users)[:30]
    for n, user in enumerate(users):
        # A category the tower does not already favour for this user, as drift brings.
        usual = category_of(
            tiny_world, without_session.recommend([request(user)]).recommendations[0].item_ids
        )
        category = next(c for c in np.argsort(np.bincount(usual, minlength=10)) if c != usual[0])
        members = [
            i
            for i, c in zip(truth.items, category_of(tiny_world, truth.items), strict=True)
            if c == category
        ]
        viewed = tuple(members[n % 5 : n % 5 + 3])  # newest first
        features = [OnlineFeatures(recent_item_ids=viewed)]
        on = with_session.recommend([request(user)], features).recommendations[0].item_ids
        off = without_session.recommend([request(user)], features).recommendations[0].item_ids
        hits_on = category_of(tiny_world, on).count(category)
        hits_off = category_of(tiny_world, off).count(category)
        more += hits_on > hits_off
        total_with, total_without = total_with + hits_on, total_without + hits_off
        assert not set(on) & set(viewed)
    assert more >= 0.8 * len(users)
    assert total_with >= 2 * total_without


def test_popularity_still_counts(
    unpacked: dict[str, Path], with_session: Retriever, brute_force: dict[str, BruteForce]
) -> None:
    truth = brute_force["1"]
    no_prior = Retriever.load(
        unpacked["1"], use_gpu=False, session=replace(SessionStage(), popularity_weight=0.0)
    )
    rng = np.random.default_rng(5)
    gains = []
    for user in sorted(truth.users)[:40]:
        features = [
            OnlineFeatures(recent_item_ids=tuple(rng.choice(truth.items, 2, replace=False)))
        ]
        with_prior = with_session.recommend([request(user)], features).recommendations[0].item_ids
        plain = no_prior.recommend([request(user)], features).recommendations[0].item_ids
        counts = [
            truth.log_count[[truth.position[i] for i in items]].mean()
            for items in (with_prior, plain)
        ]
        gains.append(counts[0] - counts[1])
    # The prior moves answers towards items users interacted with more, never away.
    assert np.mean(gains) > 0.1 and min(gains) >= 0


def test_without_recent_items_the_answer_is_the_tower_s_alone(
    with_session: Retriever, without_session: Retriever, brute_force: dict[str, BruteForce]
) -> None:
    truth = brute_force["1"]
    vector = truth.embeddings[7]
    requests = [request(u) for u in sorted(truth.users)[:10]] + [request("stranger"), request(None)]
    online = [OnlineFeatures()] * 10 + [OnlineFeatures(embedding=vector), OnlineFeatures()]
    on = with_session.recommend(requests, online).recommendations
    off = without_session.recommend(requests, online).recommendations
    assert [r.item_ids for r in on] == [r.item_ids for r in off]
    assert [r.scores for r in on] == [r.scores for r in off]
    assert [r.source for r in on][-2:] == [Source.ONLINE_EMBEDDING, Source.POPULARITY]


def test_on_by_default_for_a_two_tower_model_only(
    with_session: Retriever, unpacked: dict[str, Path]
) -> None:
    assert with_session.session == SessionStage()
    config = TowerConfig.from_json((unpacked["1"] / "user_tower.json").read_text())
    ease = make_user_tower(replace(config, kind="ease", recency_half_life=5.0))
    assert default_session_stage(ease) == SESSION_OFF
    assert default_session_stage(make_user_tower(config)) == SessionStage()


def test_a_stage_without_item_vectors_is_refused(unpacked: dict[str, Path]) -> None:
    loaded = Retriever.load(unpacked["1"], use_gpu=False)
    with pytest.raises(ValueError, match="one item vector per item id"):
        Retriever(
            model_name="m",
            model_version="1",
            user_tower=loaded.user_tower,
            history_length=loaded.history_length,
            user_ids=[],
            item_ids=loaded.item_ids,
            index=loaded.index,
            popularity=_no_popularity(),
            max_k=10,
            session=SessionStage(),
        )


def _no_popularity() -> Popularity:
    return Popularity(item_ids=[], counts=[])
