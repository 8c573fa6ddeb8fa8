"""Offline evaluation of retrieval: a chronological split and ranking metrics.

Protocol: interactions before a time cutoff train the model; for every user with
training history, the items they touch after the cutoff and had not touched before are
the targets. Each recommender scores the whole catalogue for the user given their
training history; items already in that history are never recommended. Recall@K is
the share of a user's targets found in the top K; NDCG@K weighs hits by rank (binary
relevance). Both are averaged over users.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from model_handlers.interactions import Interactions

Scorer = Callable[[np.ndarray, list[np.ndarray]], np.ndarray]
"""(user indices, their training histories oldest first) -> scores (users, num_items)."""

DEFAULT_CUTOFFS = (10, 50)


def chronological_split(
    interactions: Interactions, validation_fraction: float
) -> tuple[Interactions, Interactions]:
    """(train, validation): the last `validation_fraction` of the time span is validation."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError("validation_fraction must lie strictly between 0 and 1")
    log = interactions.sorted_by_time()
    ts = log.timestamp_ms
    cutoff = ts[0] + (1.0 - validation_fraction) * (ts[-1] - ts[0])
    before = ts < cutoff
    if before.all() or not before.any():
        raise ValueError("the split left one side empty; the log spans too little time")
    return log.select(before), log.select(~before)


def user_histories(log: Interactions) -> list[np.ndarray]:
    """Every user's items, oldest first (one array per user index, possibly empty)."""
    order = np.lexsort((log.timestamp_ms, log.user))
    users, items = log.user[order], log.item[order]
    bounds = np.searchsorted(users, np.arange(log.num_users + 1))
    return [items[bounds[u] : bounds[u + 1]] for u in range(log.num_users)]


@dataclass(frozen=True)
class EvaluationSet:
    users: np.ndarray
    """User indices evaluated."""
    histories: list[np.ndarray]
    """Each user's training items, oldest first (these are never recommended)."""
    targets: list[np.ndarray]
    """Each user's validation items that are not in their history."""

    def __len__(self) -> int:
        return len(self.users)


def evaluation_set(
    train: Interactions, validation: Interactions, *, max_users: int | None = None, seed: int = 0
) -> EvaluationSet:
    """Users with training history and at least one new item after the cutoff."""
    train_histories = user_histories(train)
    validation_histories = user_histories(validation)
    users, histories, targets = [], [], []
    for u in range(train.num_users):
        history = train_histories[u]
        if len(history) == 0:
            continue
        new = np.setdiff1d(validation_histories[u], history)
        if len(new):
            users.append(u)
            histories.append(history)
            targets.append(new)
    chosen = np.arange(len(users))
    if max_users is not None and len(users) > max_users:
        chosen = np.sort(np.random.default_rng(seed).choice(len(users), max_users, replace=False))
    return EvaluationSet(
        users=np.asarray(users, dtype=np.int64)[chosen],
        histories=[histories[n] for n in chosen],
        targets=[targets[n] for n in chosen],
    )


def top_k_unseen(scores: np.ndarray, histories: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Indices of the `k` best-scored items per row, history items excluded, best first."""
    scores = np.array(scores, dtype=np.float32, copy=True)
    for row, history in enumerate(histories):
        scores[row, history] = -np.inf
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def recall_at_k(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> float:
    """Mean over users of |top k ∩ targets| / |targets|."""
    hits = [np.isin(ranked[n, :k], t).sum() / len(t) for n, t in enumerate(targets)]
    return float(np.mean(hits)) if hits else 0.0


def ndcg_at_k(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> float:
    """Mean over users of DCG@k / ideal DCG@k with binary relevance."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    values = []
    for n, t in enumerate(targets):
        gains = np.isin(ranked[n, :k], t).astype(np.float64)
        ideal = discounts[: min(len(t), k)].sum()
        values.append(float(gains @ discounts[: len(gains)]) / ideal)
    return float(np.mean(values)) if values else 0.0


def evaluate(
    scorer: Scorer,
    eval_set: EvaluationSet,
    *,
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
    chunk: int = 512,
) -> dict[str, float]:
    """`recall@K` for every cutoff and `ndcg@K` for the smallest, over `eval_set`."""
    deepest = max(cutoffs)
    ranked = []
    for lo in range(0, len(eval_set), chunk):
        users = eval_set.users[lo : lo + chunk]
        histories = eval_set.histories[lo : lo + chunk]
        ranked.append(top_k_unseen(scorer(users, histories), histories, deepest))
    if not ranked:
        raise ValueError("nothing to evaluate: no user has new items after the cutoff")
    all_ranked = np.concatenate(ranked)
    metrics = {f"recall@{k}": recall_at_k(all_ranked, eval_set.targets, k) for k in cutoffs}
    first = min(cutoffs)
    metrics[f"ndcg@{first}"] = ndcg_at_k(all_ranked, eval_set.targets, first)
    return metrics
