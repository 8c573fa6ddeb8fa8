"""Training the two-tower model: in-batch sampled softmax with logQ correction.

Every training interaction is one example: the user, the items they touched just
before it (their history), and the item itself (the positive). The other positives in
the batch are the negatives. Popular items show up as in-batch negatives more often
than the catalogue does, which would push them down unfairly; subtracting log Q (the
item's share of training interactions) from its logit corrects for that sampling bias.

Early stopping watches Recall@50 on a chronological validation split and keeps the
best epoch. Progress is reported through callbacks, so this module prints nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model_handlers.baselines import ItemKnnBaseline, PopularityBaseline
from model_handlers.evaluation import (
    EvaluationSet,
    Scorer,
    chronological_split,
    evaluate,
    evaluation_set,
)
from model_handlers.interactions import Interactions
from model_handlers.two_tower import TowerConfig, TwoTowerModel, history_rows, user_rows

EARLY_STOPPING_METRIC = "recall@50"


@dataclass(frozen=True)
class TrainingConfig:
    dim: int = 64
    hidden: int = 128
    history_length: int = 20
    batch_size: int = 512
    max_epochs: int = 15
    patience: int = 2
    """Epochs without a better validation Recall@50 before stopping."""
    learning_rate: float = 0.005
    temperature: float = 0.05
    user_dropout: float = 0.2
    """Share of examples whose user id is hidden, so unknown users can be embedded."""
    history_dropout: float = 0.1
    """Share of examples whose history is hidden, so users without recent items work."""
    validation_fraction: float = 0.1
    max_eval_users: int = 3000
    seed: int = 0
    threads: int | None = None
    """torch threads while training (None: torch's default)."""


@dataclass(frozen=True)
class TrainingExamples:
    user: np.ndarray
    """User index per example."""
    history: np.ndarray
    """(examples, history_length) history-table rows (0 = padding)."""
    item: np.ndarray
    """The positive item per example."""


def training_examples(train: Interactions, history_length: int) -> TrainingExamples:
    """One example per interaction, with the user's `history_length` previous items."""
    order = np.lexsort((train.timestamp_ms, train.user))
    users, items = train.user[order].astype(np.int64), train.item[order].astype(np.int64)
    n = len(users)
    history = np.zeros((n, history_length), dtype=np.int64)
    first_of_user = np.r_[True, users[1:] != users[:-1]]
    position = np.arange(n) - np.maximum.accumulate(np.where(first_of_user, np.arange(n), 0))
    for lag in range(1, history_length + 1):
        has = position >= lag
        # history[:, 0] is the most recent previous item; order is irrelevant to the mean.
        history[has, lag - 1] = items[np.flatnonzero(has) - lag] + 1
    return TrainingExamples(user=users, history=history, item=items)


@dataclass
class EpochReport:
    epoch: int
    loss: float
    validation: dict[str, float]
    seconds: float


@dataclass
class TrainedModel:
    """A trained model with everything the archive and the evaluation need."""

    config: TrainingConfig
    tower_config: TowerConfig
    model: TwoTowerModel
    interactions: Interactions
    item_embeddings: np.ndarray
    """(num_items, dim) float32, unit norm, item-index order."""
    query_sample: np.ndarray
    """User-tower outputs for validation users: realistic queries for index recall."""
    metrics: dict[str, Any]
    epochs: list[EpochReport] = field(default_factory=list)


StepCallback = Callable[[int, int, int, float], None]
"""(epoch, step, steps per epoch, loss)."""
EpochCallback = Callable[[EpochReport], None]


def _tower_scorer(model: TwoTowerModel, item_embeddings: np.ndarray, history_length: int) -> Scorer:
    def score(users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        queries = embed_queries(model, users, histories, history_length)
        return queries @ item_embeddings.T

    return score


@torch.no_grad()
def embed_queries(
    model: TwoTowerModel, users: np.ndarray, histories: list[np.ndarray], history_length: int
) -> np.ndarray:
    was_training = model.training
    model.eval()
    out = model.user_tower(
        torch.as_tensor(user_rows(users)), torch.as_tensor(history_rows(histories, history_length))
    )
    model.train(was_training)
    return out.numpy().astype(np.float32)


def train_two_tower(
    interactions: Interactions,
    config: TrainingConfig = TrainingConfig(),
    *,
    on_step: StepCallback | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainedModel:
    """Train on the chronological train split, stop early on validation, and evaluate
    the best epoch against popularity and item-kNN on the same split."""
    started = time.monotonic()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    train, validation = chronological_split(interactions, config.validation_fraction)
    eval_set = evaluation_set(train, validation, max_users=config.max_eval_users, seed=config.seed)
    if len(eval_set) == 0:
        raise ValueError("no user has new items after the validation cutoff; nothing to validate")
    examples = training_examples(train, config.history_length)
    counts = train.item_counts()
    log_q = torch.as_tensor(np.log(np.maximum(counts, 1) / counts.sum()), dtype=torch.float32)

    tower_config = TowerConfig(
        num_users=interactions.num_users,
        num_items=interactions.num_items,
        num_categories=interactions.num_categories,
        dim=config.dim,
        hidden=config.hidden,
        history_length=config.history_length,
    )
    model = TwoTowerModel(tower_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    categories = torch.as_tensor(interactions.item_category, dtype=torch.long)

    n = len(examples.item)
    steps = max(1, int(np.ceil(n / config.batch_size)))
    best_value, best_state, best_epoch, stale = -1.0, None, 0, 0
    reports: list[EpochReport] = []
    for epoch in range(1, config.max_epochs + 1):
        epoch_start = time.monotonic()
        model.train()
        order = rng.permutation(n)
        total_loss = 0.0
        for step in range(steps):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            users = torch.as_tensor(user_rows(examples.user[batch]))
            users[torch.as_tensor(rng.random(len(batch)) < config.user_dropout)] = 0
            history = torch.as_tensor(examples.history[batch])
            history[torch.as_tensor(rng.random(len(batch)) < config.history_dropout)] = 0
            items = torch.as_tensor(examples.item[batch])
            loss = _in_batch_softmax_loss(
                model.user_tower(users, history),
                model.item_tower(items, categories[items]),
                items,
                log_q,
                config.temperature,
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_value = loss.detach().item()
            total_loss += loss_value
            if on_step:
                on_step(epoch, step + 1, steps, loss_value)

        item_embeddings = model.all_item_embeddings(interactions.item_category)
        scores = evaluate(_tower_scorer(model, item_embeddings, config.history_length), eval_set)
        report = EpochReport(epoch, total_loss / steps, scores, time.monotonic() - epoch_start)
        reports.append(report)
        if on_epoch:
            on_epoch(report)
        if scores[EARLY_STOPPING_METRIC] > best_value:
            best_value, best_epoch, stale = scores[EARLY_STOPPING_METRIC], epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                break

    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    item_embeddings = model.all_item_embeddings(interactions.item_category)
    metrics = {
        "two_tower": evaluate(
            _tower_scorer(model, item_embeddings, config.history_length), eval_set
        ),
        "popularity": evaluate(PopularityBaseline(train), eval_set),
        "item_knn": evaluate(ItemKnnBaseline(train), eval_set),
        "protocol": _protocol(interactions, train, validation, eval_set),
        "training": {
            "best_epoch": best_epoch,
            "epochs_run": len(reports),
            "early_stopping_metric": EARLY_STOPPING_METRIC,
            "seconds": round(time.monotonic() - started, 2),
            "examples": n,
            "config": asdict(config),
        },
    }
    sample_users = eval_set.users[:1000]
    query_sample = embed_queries(
        model, sample_users, eval_set.histories[:1000], config.history_length
    )
    return TrainedModel(
        config=config,
        tower_config=tower_config,
        model=model,
        interactions=interactions,
        item_embeddings=item_embeddings,
        query_sample=query_sample,
        metrics=metrics,
        epochs=reports,
    )


def _in_batch_softmax_loss(
    users: torch.Tensor,
    items: torch.Tensor,
    item_index: torch.Tensor,
    log_q: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    logits = users @ items.T / temperature - log_q[item_index].unsqueeze(0)
    # The same item twice in a batch is not a negative of itself.
    duplicate = item_index.unsqueeze(0) == item_index.unsqueeze(1)
    duplicate.fill_diagonal_(False)
    logits = logits.masked_fill(duplicate, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(item_index)))


def _protocol(
    interactions: Interactions,
    train: Interactions,
    validation: Interactions,
    eval_set: EvaluationSet,
) -> dict[str, Any]:
    return {
        "split": "chronological",
        "interactions": len(interactions),
        "train_interactions": len(train),
        "validation_interactions": len(validation),
        "cutoff_ms": int(validation.timestamp_ms.min()),
        "users": interactions.num_users,
        "items": interactions.num_items,
        "users_evaluated": len(eval_set),
        "seen_items_excluded": True,
    }
