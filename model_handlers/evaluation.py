"""The project's evaluation protocol, in one place: the split and the ranking metrics.

Used by the trainer's validation, `recsys evaluate`, the quality benchmark and the
retraining gate, so every figure the project quotes means the same thing.

Protocol:

- **Split, per user and chronological**: each user's last 20% of interactions (rounded
  down, at least one) is test, the rest is train. Interactions at the same time are
  ordered by item index, so the split does not depend on the order of the file's rows
  (MovieLens has many ratings per second; the file's order within a second carries
  signal that a real log would not have: popularity NDCG@10 0.121 with it, 0.111
  without).
- **Candidates**: every item the model knows; the user's train items are excluded.
- **Users**: every test user with at least one train interaction. Their targets are
  their test items that are not among their train items (a repeat cannot be
  recommended). Test items the model does not know stay targets: they count as misses.
  A user whose every test item is a repeat has nothing to find and is left out.
- **Metrics at k** (binary relevance, averaged over users with a 95% interval):
  Recall@k = hits / min(k, |targets|); NDCG@k = DCG / ideal DCG; MRR@k = 1 / rank of the
  first hit (0 without one); coverage@k = share of the catalogue that appears in any
  user's top k; popularity_rank@k = mean popularity rank (1 = most interacted in train)
  of the recommended items.
- **Ties in scores** are broken by item index (lower first), so results are
  deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from model_handlers.interactions import Interactions

Scorer = Callable[[np.ndarray, list[np.ndarray]], np.ndarray]
"""(user indices, their training histories oldest first) -> scores (users, num_items)."""

TEST_FRACTION = 0.2
DEFAULT_CUTOFFS = (10, 50)
Z_95 = 1.959964


def per_user_split(
    interactions: Interactions, test_fraction: float = TEST_FRACTION
) -> tuple[Interactions, Interactions]:
    """(train, test): each user's last `test_fraction` of interactions (rounded down,
    at least one) is test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must lie strictly between 0 and 1")
    if len(interactions) == 0:
        raise ValueError("no interactions to split")
    order = chronological_order(interactions)
    users = interactions.user[order]
    starts = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(users)])
    position = np.arange(len(users)) - np.repeat(starts, counts)
    n_test = np.maximum(1, np.floor(counts * test_fraction + 1e-9)).astype(np.int64)
    is_test = np.zeros(len(interactions), dtype=bool)
    is_test[order] = position >= np.repeat(counts - n_test, counts)
    return interactions.select(~is_test), interactions.select(is_test)


def chronological_order(log: Interactions) -> np.ndarray:
    """Row order by user, then time, then item index (the protocol's tie-break)."""
    return np.lexsort((log.item, log.timestamp_ms, log.user))


def user_histories(log: Interactions) -> list[np.ndarray]:
    """Every user's items, oldest first (one array per user index, possibly empty)."""
    order = chronological_order(log)
    users, items = log.user[order], log.item[order]
    bounds = np.searchsorted(users, np.arange(log.num_users + 1))
    return [items[bounds[u] : bounds[u + 1]].astype(np.int64) for u in range(log.num_users)]


@dataclass(frozen=True)
class EvaluationSet:
    users: np.ndarray
    """User indices evaluated."""
    histories: list[np.ndarray]
    """Each user's training items, oldest first (these are never recommended)."""
    targets: list[np.ndarray]
    """Each user's test items not in their history; -1 marks an item the model does not
    know (it can never be hit, but counts in |targets|)."""
    num_items: int
    popularity_rank: np.ndarray = field(repr=False)
    """1-based popularity rank of every item in the training data (ties by index)."""

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, rows: np.ndarray) -> EvaluationSet:
        return EvaluationSet(
            users=self.users[rows],
            histories=[self.histories[n] for n in rows],
            targets=[self.targets[n] for n in rows],
            num_items=self.num_items,
            popularity_rank=self.popularity_rank,
        )


def evaluation_set(
    train: Interactions,
    test: Interactions,
    *,
    max_users: int | None = None,
    seed: int = 0,
    unknown_targets: Sequence[int] | None = None,
) -> EvaluationSet:
    """The users to evaluate: test users with at least one train interaction.

    `train` and `test` share vocabularies (the output of `per_user_split`).
    `unknown_targets[u]`, when given, is how many of user u's test items the model does
    not know (they were dropped from `test` when it was mapped to the model's items).
    """
    train_histories = user_histories(train)
    test_histories = user_histories(test)
    users, histories, targets = [], [], []
    for u in range(train.num_users):
        history = train_histories[u]
        if len(history) == 0 or (
            len(test_histories[u]) == 0 and not (unknown_targets and unknown_targets[u])
        ):
            continue
        new = np.setdiff1d(test_histories[u], history)
        missing = int(unknown_targets[u]) if unknown_targets else 0
        if len(new) + missing == 0:
            continue
        users.append(u)
        histories.append(history)
        targets.append(np.r_[new, np.full(missing, -1, dtype=np.int64)].astype(np.int64))
    counts = train.item_counts()
    rank = np.empty(train.num_items, dtype=np.int64)
    rank[np.argsort(-counts, kind="stable")] = np.arange(1, train.num_items + 1)
    eval_set = EvaluationSet(
        users=np.asarray(users, dtype=np.int64),
        histories=histories,
        targets=targets,
        num_items=train.num_items,
        popularity_rank=rank,
    )
    if max_users is not None and len(users) > max_users:
        chosen = np.sort(np.random.default_rng(seed).choice(len(users), max_users, replace=False))
        eval_set = eval_set.subset(chosen)
    return eval_set


def top_k_unseen(scores: np.ndarray, histories: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Indices of the `k` best-scored items per row, history items excluded, best first;
    equal scores go to the lower item index."""
    scores = np.array(scores, dtype=np.float32, copy=True)
    for row, history in enumerate(histories):
        scores[row, history] = -np.inf
    k = min(k, scores.shape[1])
    # Sort on (-score, index): a stable argsort of -score after ordering by index.
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    # argpartition may cut a tie at the k-th score arbitrarily: take every item tied
    # with it, then order the candidates exactly.
    kth = np.take_along_axis(scores, top, axis=1).min(axis=1, keepdims=True)
    ranked = np.empty((len(scores), k), dtype=np.int64)
    for row in range(len(scores)):
        candidates = np.flatnonzero(scores[row] >= kth[row])
        order = np.lexsort((candidates, -scores[row, candidates]))
        ranked[row] = candidates[order[:k]]
    return ranked


@dataclass(frozen=True)
class UserMetrics:
    """Per-user values of each metric (one row per evaluated user)."""

    values: dict[str, np.ndarray]
    coverage: dict[str, float]


def per_user_metrics(
    ranked: np.ndarray, eval_set: EvaluationSet, cutoffs: Sequence[int]
) -> UserMetrics:
    discounts = 1.0 / np.log2(np.arange(2, max(cutoffs) + 2))
    hit = np.zeros(ranked.shape, dtype=bool)
    sizes = np.zeros(len(ranked), dtype=np.int64)
    for n, targets in enumerate(eval_set.targets):
        hit[n] = np.isin(ranked[n], targets[targets >= 0])
        sizes[n] = len(targets)
    values: dict[str, np.ndarray] = {}
    coverage: dict[str, float] = {}
    for k in cutoffs:
        h = hit[:, :k]  # fewer than k columns when the catalogue is smaller than k
        ideal = np.cumsum(discounts)[np.minimum(sizes, k) - 1]
        first = np.where(h.any(axis=1), h.argmax(axis=1) + 1, 0)
        values[f"recall@{k}"] = h.sum(axis=1) / np.minimum(sizes, k)
        values[f"ndcg@{k}"] = (h * discounts[: h.shape[1]]).sum(axis=1) / ideal
        values[f"mrr@{k}"] = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
        values[f"popularity_rank@{k}"] = eval_set.popularity_rank[ranked[:, :k]].mean(axis=1)
        coverage[f"coverage@{k}"] = len(np.unique(ranked[:, :k])) / eval_set.num_items
    return UserMetrics(values, coverage)


@dataclass(frozen=True)
class Evaluation:
    users: int
    metrics: dict[str, float]
    """Means over users (coverage: over the catalogue)."""
    ci95: dict[str, float]
    """Half-width of the 95% interval of each mean over users (normal approximation)."""
    per_user: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    """Each metric's value per evaluated user, in the order of `user_keys`."""
    user_keys: np.ndarray | None = field(default=None, repr=False, compare=False)
    """Who each row of `per_user` is (user indices here; `evaluate_model_directory`
    turns them into user ids), so two models' values can be paired user by user."""

    def to_dict(self) -> dict[str, object]:
        return {"users": self.users, "metrics": self.metrics, "ci95": self.ci95}


def evaluate_full(
    scorer: Scorer,
    eval_set: EvaluationSet,
    *,
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
    chunk: int = 512,
) -> Evaluation:
    """Score every evaluated user, rank their unseen items, and average the metrics."""
    if len(eval_set) == 0:
        raise ValueError("nothing to evaluate: no test user has a train interaction")
    deepest = min(max(cutoffs), eval_set.num_items)
    ranked = []
    for lo in range(0, len(eval_set), chunk):
        users = eval_set.users[lo : lo + chunk]
        histories = eval_set.histories[lo : lo + chunk]
        scores = np.asarray(scorer(users, histories))
        if scores.shape != (len(users), eval_set.num_items):
            raise ValueError(
                f"the scorer returned {scores.shape}, expected ({len(users)}, {eval_set.num_items})"
            )
        ranked.append(top_k_unseen(scores, histories, deepest))
    per_user = per_user_metrics(np.concatenate(ranked), eval_set, cutoffs)
    n = len(eval_set)
    metrics, ci = {}, {}
    for name, values in per_user.values.items():
        metrics[name] = float(values.mean())
        ci[name] = float(Z_95 * values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    metrics.update(per_user.coverage)
    return Evaluation(
        users=n, metrics=metrics, ci95=ci, per_user=per_user.values, user_keys=eval_set.users
    )


def evaluate(
    scorer: Scorer,
    eval_set: EvaluationSet,
    *,
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
    chunk: int = 512,
) -> dict[str, float]:
    """The mean of every metric at every cutoff (`evaluate_full` without intervals)."""
    return evaluate_full(scorer, eval_set, cutoffs=cutoffs, chunk=chunk).metrics
