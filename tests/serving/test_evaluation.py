"""The evaluation protocol on hand-made cases: the per-user split, the metrics, ties,
users with one interaction, items unknown to the model, heavy users; and the baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model_handlers.baselines import EaseBaseline, ItemKnnBaseline, PopularityBaseline
from model_handlers.evaluation import (
    evaluate,
    evaluate_full,
    evaluation_set,
    per_user_split,
    top_k_unseen,
)
from model_handlers.interactions import Interactions, from_id_columns


def _log(rows: list[tuple[str, str, int]]) -> Interactions:
    users, items, ts = zip(*rows, strict=True)
    return from_id_columns(np.array(users), np.array(items), np.array(ts))


def _fixed(scores_by_item: dict[str, float], log: Interactions):  # type: ignore[no-untyped-def]
    """A scorer giving every user the same scores (by item id)."""
    row = np.array([scores_by_item.get(i, 0.0) for i in log.item_ids], dtype=np.float32)
    return lambda users, histories: np.tile(row, (len(users), 1))


def test_each_users_last_fifth_is_test_at_least_one() -> None:
    # a: 10 interactions -> 2 test; b: 4 -> floor(0.8)=0 -> at least 1; c: 1 -> its only one.
    rows = [("a", f"i{n}", n) for n in range(10)]
    rows += [("b", f"i{n}", 100 + n) for n in range(4)]
    rows += [("c", "i0", 5)]
    train, test = per_user_split(_log(rows))
    held = sorted(
        (train.user_ids[u], test.item_ids[i]) for u, i in zip(test.user, test.item, strict=True)
    )
    assert held == [("a", "i8"), ("a", "i9"), ("b", "i3"), ("c", "i0")]
    assert len(train) + len(test) == len(rows)


def test_the_split_does_not_depend_on_row_order_within_a_second() -> None:
    rows = [("a", "x", 1), ("a", "z", 2), ("a", "y", 2), ("a", "w", 0), ("a", "v", 0)]
    held = {
        tuple(
            per_user_split(_log(order))[1].item_ids[i] for i in per_user_split(_log(order))[1].item
        )
        for order in (rows, rows[::-1])
    }
    # Ties in time go by item index: of y and z (both at t=2), z is the later one.
    assert held == {("z",)}


def test_a_user_with_one_interaction_has_no_history_and_is_not_evaluated() -> None:
    log = _log(
        [("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("a", "w", 4), ("a", "v", 5), ("b", "x", 6)]
    )
    train, test = per_user_split(log)
    eval_set = evaluation_set(train, test)
    assert [log.user_ids[u] for u in eval_set.users] == ["a"]


def test_recall_is_hits_over_min_k_and_targets_and_ndcg_binary() -> None:
    # u has 15 interactions: the last 3 (h, i, j) are test. v has 5: k is test.
    rows = [
        ("u", it, t)
        for t, it in enumerate(
            ["a", "b", "c", "d", "e", "f", "g", "x", "y", "p", "q", "r", "h", "i", "j"]
        )
    ]
    rows += [("v", "a", 0), ("v", "b", 1), ("v", "c", 2), ("v", "d", 3), ("v", "k", 4)]
    log = _log(rows)
    train, test = per_user_split(log)
    eval_set = evaluation_set(train, test)
    assert [log.user_ids[u] for u in eval_set.users] == ["u", "v"]
    scores = {"e": 10, "j": 9, "k": 8.5, "h": 7}  # e is in u's train: excluded
    metrics = evaluate_full(_fixed(scores, log), eval_set, cutoffs=(2, 3)).metrics
    # u: top 3 = j, k, h -> hits at ranks 1 and 3; v: top 3 = e, j, k -> hit at 3.
    assert metrics["recall@3"] == pytest.approx((2 / 3 + 1 / 1) / 2)
    assert metrics["recall@2"] == pytest.approx((1 / 2 + 0) / 2)  # u: min(k, |targets|) = 2
    ndcg_u = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    ndcg_v = (1 / math.log2(4)) / 1
    assert metrics["ndcg@3"] == pytest.approx((ndcg_u + ndcg_v) / 2)
    assert metrics["mrr@3"] == pytest.approx((1 + 1 / 3) / 2)


def test_ties_in_scores_go_to_the_lower_item_index() -> None:
    scores = np.array([[1.0, 2.0, 2.0, 2.0, 0.5]])
    assert top_k_unseen(scores, [np.array([], dtype=np.int64)], 2).tolist() == [[1, 2]]
    # Many ties around the k-th place: still the lowest indices, in order.
    flat = np.zeros((1, 50), dtype=np.float32)
    assert top_k_unseen(flat, [np.array([3])], 4).tolist() == [[0, 1, 2, 4]]


def test_seen_items_are_never_ranked() -> None:
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    assert top_k_unseen(scores, [np.array([0, 2])], 3).tolist() == [[1, 3, 4]]


def test_items_unknown_to_the_model_count_as_misses() -> None:
    log = _log([("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("a", "w", 4), ("a", "v", 5)])
    train, test = per_user_split(log)  # test: v
    # The model also failed to know one more test item of a's: it counts in |targets|.
    eval_set = evaluation_set(train, test, unknown_targets=[1])
    assert len(eval_set.targets[0]) == 2
    metrics = evaluate_full(_fixed({"v": 1.0}, log), eval_set, cutoffs=(10,)).metrics
    assert metrics["recall@10"] == pytest.approx(1 / 2)


def test_a_heavy_users_whole_history_is_excluded() -> None:
    # h has 500 train items; a popularity ranking must skip all of them.
    rows = [("h", f"i{n:03d}", n) for n in range(625)]
    rows += [(f"u{m}", f"i{n:03d}", 1000 + n) for m in range(3) for n in range(0, 600, 7)]
    log = _log(rows)
    train, test = per_user_split(log)
    eval_set = evaluation_set(train, test)
    heavy = next(n for n, u in enumerate(eval_set.users) if log.user_ids[u] == "h")
    assert len(eval_set.histories[heavy]) == 500
    ranked = top_k_unseen(
        PopularityBaseline(train)(eval_set.users, eval_set.histories), eval_set.histories, 50
    )
    assert not set(ranked[heavy]) & set(eval_set.histories[heavy].tolist())


def test_coverage_popularity_rank_and_intervals() -> None:
    rows = [
        (u, i, t)
        for t, (u, i) in enumerate(
            [
                ("a", "x"),
                ("a", "y"),
                ("a", "z"),
                ("a", "w"),
                ("a", "q"),
                ("b", "x"),
                ("b", "y"),
                ("b", "z"),
                ("b", "w"),
                ("b", "r"),
            ]
        )
    ]
    log = _log(rows)
    train, test = per_user_split(log)
    result = evaluate_full(PopularityBaseline(train), evaluation_set(train, test), cutoffs=(1,))
    # Train: a and b both have w, x, y, z; unseen q and r have no count, a tie that goes
    # to the lower index: both users get q (ids sort q, r, w, ...), popularity rank 5.
    assert result.users == 2
    assert result.metrics["coverage@1"] == pytest.approx(1 / log.num_items)
    assert result.metrics["popularity_rank@1"] == pytest.approx(5.0)
    assert set(result.ci95) >= {"recall@1", "ndcg@1", "mrr@1"}


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


def test_ease_scores_follow_co_occurrence() -> None:
    rows = [
        (u, i, t)
        for t, (u, i) in enumerate(
            [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y"), ("c", "z"), ("c", "w"), ("d", "x")]
        )
    ]
    log = _log(rows)
    position = {item: n for n, item in enumerate(log.item_ids)}
    scores = EaseBaseline(log, l2=1.0)(np.array([3]), [np.array([position["x"]])])[0]
    assert scores[position["y"]] > max(scores[position["z"]], scores[position["w"]])


def test_evaluate_reports_every_metric_at_every_cutoff(tiny_log: Interactions) -> None:
    train, test = per_user_split(tiny_log)
    eval_set = evaluation_set(train, test)
    assert len(eval_set) > 0.9 * tiny_log.num_users
    metrics = evaluate(PopularityBaseline(train), eval_set)
    for k in (10, 50):
        assert {
            f"recall@{k}",
            f"ndcg@{k}",
            f"mrr@{k}",
            f"coverage@{k}",
            f"popularity_rank@{k}",
        } <= set(metrics)
    assert 0 < metrics["recall@10"] <= metrics["recall@50"] <= 1
