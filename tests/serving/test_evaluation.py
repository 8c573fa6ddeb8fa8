"""Offline evaluation: the chronological split, the metrics, and the baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model_handlers.baselines import ItemKnnBaseline, PopularityBaseline
from model_handlers.evaluation import (
    chronological_split,
    evaluate,
    evaluation_set,
    ndcg_at_k,
    recall_at_k,
    top_k_unseen,
)
from model_handlers.interactions import Interactions, from_id_columns


def _log(rows: list[tuple[str, str, int]]) -> Interactions:
    users, items, ts = zip(*rows, strict=True)
    return from_id_columns(np.array(users), np.array(items), np.array(ts))


def test_recall_and_ndcg_follow_their_definitions() -> None:
    ranked = np.array([[3, 1, 2, 0], [0, 1, 2, 3]])
    targets = [np.array([1, 0]), np.array([2])]
    # User 0 finds item 1 at rank 2 (and item 0 at rank 4); user 1 finds item 2 at rank 3.
    assert recall_at_k(ranked, targets, 2) == pytest.approx((1 / 2 + 0) / 2)
    assert recall_at_k(ranked, targets, 4) == pytest.approx(1.0)
    ideal_two = 1 + 1 / math.log2(3)
    expected_user0 = (1 / math.log2(3)) / ideal_two
    assert ndcg_at_k(ranked, targets, 2) == pytest.approx((expected_user0 + 0) / 2)
    expected_user1 = (1 / math.log2(4)) / 1.0
    assert ndcg_at_k(ranked[1:], targets[1:], 3) == pytest.approx(expected_user1)


def test_the_split_is_chronological(tiny_log: Interactions) -> None:
    train, validation = chronological_split(tiny_log, 0.2)
    assert len(train) + len(validation) == len(tiny_log)
    assert train.timestamp_ms.max() < validation.timestamp_ms.min()
    span = tiny_log.timestamp_ms.max() - tiny_log.timestamp_ms.min()
    cutoff = validation.timestamp_ms.min() - tiny_log.timestamp_ms.min()
    assert 0.75 * span <= cutoff <= 0.85 * span
    with pytest.raises(ValueError):
        chronological_split(tiny_log, 1.0)


def test_targets_are_new_items_of_users_with_history() -> None:
    log = _log(
        [
            ("a", "x", 1),
            ("a", "y", 2),
            ("b", "x", 3),
            ("a", "x", 10),
            ("a", "z", 11),
            ("c", "z", 12),
        ]
    )
    train, validation = chronological_split(log, 0.5)
    eval_set = evaluation_set(train, validation)
    # c has no history; a's "x" was already seen, only "z" is new.
    assert [log.user_ids[u] for u in eval_set.users] == ["a"]
    assert [log.item_ids[i] for i in eval_set.targets[0]] == ["z"]
    assert sorted(log.item_ids[i] for i in eval_set.histories[0]) == ["x", "y"]


def test_seen_items_are_never_ranked() -> None:
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    assert top_k_unseen(scores, [np.array([0, 2])], 3).tolist() == [[1, 3, 4]]


def test_popularity_ranks_by_training_counts() -> None:
    log = _log(
        [("a", "x", 1), ("b", "x", 2), ("c", "x", 3), ("a", "y", 4), ("b", "y", 5), ("c", "z", 6)]
    )
    scores = PopularityBaseline(log)(np.array([0]), [np.array([], dtype=np.int64)])
    order = [log.item_ids[i] for i in np.argsort(-scores[0], kind="stable")]
    assert order == ["x", "y", "z"]


def test_item_knn_recommends_items_that_co_occur() -> None:
    # x and y are always together; z goes with w.
    rows = [
        (u, i, t)
        for t, (u, i) in enumerate(
            [
                ("a", "x"),
                ("a", "y"),
                ("b", "x"),
                ("b", "y"),
                ("c", "z"),
                ("c", "w"),
                ("d", "z"),
                ("d", "w"),
                ("e", "x"),
            ]
        )
    ]
    log = _log(rows)
    knn = ItemKnnBaseline(log, neighbours=2)
    position = {item: n for n, item in enumerate(log.item_ids)}
    scores = knn(np.array([0]), [np.array([position["x"]])])[0]
    assert scores[position["y"]] > 0
    assert scores[position["z"]] == 0 and scores[position["w"]] == 0


def test_evaluate_reports_recall_at_10_and_50_and_ndcg_at_10(tiny_log: Interactions) -> None:
    train, validation = chronological_split(tiny_log, 0.1)
    eval_set = evaluation_set(train, validation)
    metrics = evaluate(PopularityBaseline(train), eval_set)
    assert set(metrics) == {"recall@10", "recall@50", "ndcg@10"}
    assert 0 < metrics["recall@10"] <= metrics["recall@50"] <= 1
