"""Scoring a trained model directory on held-out files with the project's protocol
(`recsys evaluate`): the same `evaluation` code the trainer validates with.

`train` is the history the model may use (and the items excluded from each user's
ranking); `test` holds the targets. Ids are matched by their string form. Items the
model does not know cannot be recommended: in `train` they are left out of the
history, in `test` they stay targets and count as misses. Users the model does not
know are embedded from their history alone (the tower's unknown-user row).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model_handlers.evaluation import Evaluation, Scorer, evaluate_full, evaluation_set
from model_handlers.interactions import Interactions
from model_handlers.model_directory import read_item_embeddings, read_item_ids, read_user_ids
from model_handlers.two_tower import history_rows, load_user_tower

CUTOFF = 10
REPORTED = ("ndcg", "recall", "mrr", "coverage")


def _to_model_items(
    log: Interactions, position: dict[str, int], users: dict[str, int]
) -> Interactions:
    """`log` re-indexed to the model's items and the shared user list; rows whose item
    the model does not know are dropped."""
    item_map = np.array([position.get(i, -1) for i in log.item_ids], dtype=np.int64)
    user_map = np.array([users[u] for u in log.user_ids], dtype=np.int64)
    items = item_map[log.item]
    known = items >= 0
    return Interactions(
        user_ids=list(users),
        item_ids=list(position),
        item_category=np.zeros(len(position), dtype=np.int32),
        category_names=["unknown"],
        user=user_map[log.user[known]].astype(np.int32),
        item=items[known].astype(np.int32),
        timestamp_ms=log.timestamp_ms[known],
        session=log.session[known],
        dwell_ms=log.dwell_ms[known],
    )


def evaluate_model_directory(
    model_dir: Path, train: Interactions, test: Interactions, *, cutoffs: tuple[int, ...] = (10,)
) -> Evaluation:
    tower = load_user_tower(model_dir)
    history_length = int(tower.config.history_length)  # type: ignore[union-attr,arg-type]
    item_ids = read_item_ids(model_dir)
    position = {item: n for n, item in enumerate(item_ids)}
    model_users = {u: n for n, u in enumerate(read_user_ids(model_dir))}
    users = {u: n for n, u in enumerate(dict.fromkeys([*train.user_ids, *test.user_ids]))}
    train_mapped = _to_model_items(train, position, users)
    test_mapped = _to_model_items(test, position, users)
    test_unknown = _unknown_targets(test, position, users)
    eval_set = evaluation_set(train_mapped, test_mapped, unknown_targets=test_unknown)
    model_row = np.array([model_users.get(u, -1) for u in users], dtype=np.int64)
    embeddings = read_item_embeddings(model_dir)

    def score(local_users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        rows = model_row[local_users]
        with torch.no_grad():
            queries = tower(
                torch.as_tensor(np.where(rows >= 0, rows + 1, 0)),
                torch.as_tensor(history_rows(histories, history_length)),
            ).numpy()
        return np.asarray(queries @ embeddings.T)

    scorer: Scorer = score
    evaluation = evaluate_full(scorer, eval_set, cutoffs=cutoffs)
    # Rows named by user id, so that two models scored on the same files pair up.
    user_ids = np.asarray(list(users), dtype=object)
    assert evaluation.user_keys is not None
    return replace(evaluation, user_keys=user_ids[evaluation.user_keys])


def _unknown_targets(
    test: Interactions, position: dict[str, int], users: dict[str, int]
) -> list[int]:
    """Per user: distinct test items the model does not know (misses by construction)."""
    counts = [0] * len(users)
    seen: set[tuple[int, int]] = set()
    for u, i in zip(test.user.tolist(), test.item.tolist(), strict=True):
        if test.item_ids[i] not in position and (u, i) not in seen:
            seen.add((u, i))
            counts[users[test.user_ids[u]]] += 1
    return counts


def report(evaluation: Evaluation, k: int = CUTOFF) -> dict[str, object]:
    """The `recsys evaluate` JSON: users and the headline metrics at k (with intervals)."""
    return {
        "users": evaluation.users,
        "metrics": {f"{m}@{k}": round(evaluation.metrics[f"{m}@{k}"], 6) for m in REPORTED},
        "ci95": {
            f"{m}@{k}": round(evaluation.ci95[f"{m}@{k}"], 6)
            for m in REPORTED
            if f"{m}@{k}" in evaluation.ci95
        },
    }
