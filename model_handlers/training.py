"""Training: the default recency-weighted EASE model, or the two-tower model.

Both are validated the same way: a per-user chronological holdout of the *training*
data (each user's last 20%, `evaluation.per_user_split`), so every user with enough
history is a validation user. Hyperparameters (EASE) or the number of epochs
(two-tower) are chosen on it, then the model is refitted on all the training data.

Two-tower: every training interaction is one example: the user, the items they touched
just before it (their history), and the item itself (the positive). The other positives
in the batch are the negatives. Popular items show up as in-batch negatives more often
than the catalogue does, which would push them down unfairly; subtracting log Q (the
item's share of training interactions) from its logit corrects for that sampling bias.
Early stopping watches Recall@50 on the holdout after `min_epochs`, with a patience of
several epochs so that one noisy epoch cannot end training.

Progress is reported through callbacks, so this module prints nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_handlers import ease
from model_handlers.baselines import ItemKnnBaseline, PopularityBaseline
from model_handlers.evaluation import (
    EvaluationSet,
    Scorer,
    evaluate,
    evaluation_set,
    per_user_split,
    user_histories,
)
from model_handlers.interactions import Interactions
from model_handlers.two_tower import TowerConfig, TwoTowerModel, history_rows, user_rows

MODELS = ("ease", "two_tower")
DEFAULT_MODEL = "ease"
QUERY_SAMPLE_SIZE = 2000
EARLY_STOPPING_METRIC = "recall@50"


@dataclass(frozen=True)
class TrainingConfig:
    model: str = DEFAULT_MODEL
    """`ease` (recency-weighted EASE, the default) or `two_tower`."""
    ease: ease.EaseConfig = field(default_factory=ease.EaseConfig)
    dim: int = 64
    hidden: int = 128
    history_length: int = 20
    batch_size: int = 512
    max_epochs: int = 15
    min_epochs: int = 3
    """Epochs always run before early stopping may end training."""
    patience: int = 3
    """Epochs without a better validation Recall@50 before stopping."""
    refit: bool = True
    """Retrain on all the data for the selected number of epochs (else keep the best
    epoch of the run that never saw the holdout)."""
    learning_rate: float = 0.005
    temperature: float = 0.05
    user_dropout: float = 0.2
    """Share of examples whose user id is hidden, so unknown users can be embedded."""
    history_dropout: float = 0.1
    """Share of examples whose history is hidden, so users without recent items work."""
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
    order = np.lexsort((train.item, train.timestamp_ms, train.user))
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
    refit: bool = False
    """An epoch of the refit on all data (no validation then)."""


@dataclass
class TrainedModel:
    """A trained model with everything the archive and the evaluation need."""

    config: TrainingConfig
    tower_config: TowerConfig
    user_tower: nn.Module
    interactions: Interactions
    item_embeddings: np.ndarray
    """(num_items, dim) float32, item-index order (unit norm for the two-tower model)."""
    query_sample: np.ndarray
    """Queries of real users' histories: realistic queries for the index recall."""
    metrics: dict[str, Any]
    epochs: list[EpochReport] = field(default_factory=list)

    def scorer(self) -> Scorer:
        """Scores of the final model over every item, for a user and their history."""
        tower, embeddings, length = (
            self.user_tower,
            self.item_embeddings,
            self.tower_config.history_length,
        )

        def score(users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
            return _embed(tower, users, histories, length) @ embeddings.T

        return score


StepCallback = Callable[[int, int, int, float], None]
"""(epoch, step, steps per epoch, loss)."""
EpochCallback = Callable[[EpochReport], None]
MessageCallback = Callable[[str], None]


@torch.no_grad()
def _embed(
    tower: nn.Module, users: np.ndarray, histories: list[np.ndarray], history_length: int
) -> np.ndarray:
    was_training = tower.training
    tower.eval()
    out = tower(
        torch.as_tensor(user_rows(users)), torch.as_tensor(history_rows(histories, history_length))
    )
    tower.train(was_training)
    return np.asarray(out.numpy(), dtype=np.float32)


def embed_queries(
    model: TwoTowerModel, users: np.ndarray, histories: list[np.ndarray], history_length: int
) -> np.ndarray:
    return _embed(model.user_tower, users, histories, history_length)


def _tower_scorer(model: TwoTowerModel, item_embeddings: np.ndarray, history_length: int) -> Scorer:
    def score(users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        queries = embed_queries(model, users, histories, history_length)
        return queries @ item_embeddings.T

    return score


def train_model(
    interactions: Interactions,
    config: TrainingConfig = TrainingConfig(),
    *,
    on_step: StepCallback | None = None,
    on_epoch: EpochCallback | None = None,
    on_message: MessageCallback | None = None,
) -> TrainedModel:
    """Train the model `config.model` names."""
    if config.model == "ease":
        return train_ease(interactions, config, on_message=on_message)
    if config.model == "two_tower":
        return train_two_tower(interactions, config, on_step=on_step, on_epoch=on_epoch)
    raise ValueError(f"unknown model {config.model!r}; choose one of {', '.join(MODELS)}")


def _holdout(
    interactions: Interactions, config: TrainingConfig
) -> tuple[Interactions, EvaluationSet]:
    fit, validation = per_user_split(interactions)
    eval_set = evaluation_set(fit, validation, max_users=config.max_eval_users, seed=config.seed)
    if len(eval_set) == 0:
        raise ValueError("no user has enough history for a validation holdout; too little data")
    return fit, eval_set


def _peers(fit: Interactions, eval_set: EvaluationSet) -> dict[str, Any]:
    return {
        "popularity": evaluate(PopularityBaseline(fit), eval_set),
        "item_knn": evaluate(ItemKnnBaseline(fit), eval_set),
    }


def train_ease(
    interactions: Interactions,
    config: TrainingConfig = TrainingConfig(),
    *,
    on_message: MessageCallback | None = None,
) -> TrainedModel:
    """Choose λ and the recency weighting on the holdout, then fit on all the data."""
    started = time.monotonic()
    ease_config = replace(config.ease, max_eval_users=config.max_eval_users, seed=config.seed)
    fit, eval_set = _holdout(interactions, config)
    selection = ease.select_settings(interactions, ease_config, on_progress=on_message)
    fitted = ease.fit_ease(interactions, selection.settings, ease_config)
    rank = fitted.item_vectors.shape[1]
    tower_config = TowerConfig(
        num_users=interactions.num_users,
        num_items=interactions.num_items,
        num_categories=interactions.num_categories,
        dim=rank,
        hidden=0,
        history_length=ease_config.history_length,
        kind="ease",
        recency_half_life=selection.settings.half_life,
        recency_floor=selection.settings.floor,
    )
    tower = ease.EaseUserTower(tower_config)
    histories = user_histories(interactions)
    with torch.no_grad():
        tower.history_embedding.weight.copy_(
            torch.as_tensor(np.vstack([np.zeros((1, rank), np.float32), fitted.query_rows]))
        )
        tower.user_embedding.weight.zero_()
        tower.user_embedding.weight[1:] = torch.as_tensor(
            ease.queries(fitted.query_rows, histories, fitted.weights)
        )
    tower.eval()
    metrics = {
        "ease": selection.validation,
        **_peers(fit, eval_set),
        "protocol": _protocol(interactions, fit, eval_set),
        "training": {
            "model": "ease",
            "selected": asdict(selection.settings),
            "selection_metric": ease.SELECTION_METRIC,
            "grid": selection.grid,
            "seconds": round(time.monotonic() - started, 2),
            "config": asdict(config),
        },
    }
    metrics = _json_safe(metrics)
    trained = TrainedModel(
        config=config,
        tower_config=tower_config,
        user_tower=tower,
        interactions=interactions,
        item_embeddings=fitted.item_vectors,
        query_sample=np.zeros((0, rank), np.float32),
        metrics=metrics,
    )
    trained.query_sample = _query_sample(trained, histories, config.seed)
    return trained


def _query_sample(trained: TrainedModel, histories: list[np.ndarray], seed: int) -> np.ndarray:
    """Queries of users' whole histories and of their histories cut at a random point
    (as a user looked mid-history), up to QUERY_SAMPLE_SIZE."""
    rng = np.random.default_rng(seed)
    users = np.flatnonzero([len(h) > 0 for h in histories])
    cut = [histories[u][: max(1, int(rng.integers(1, len(histories[u]) + 1)))] for u in users]
    all_users = np.r_[users, users]
    all_histories = [histories[u] for u in users] + cut
    chosen = rng.permutation(len(all_users))[:QUERY_SAMPLE_SIZE]
    # Unknown user (-1): the query comes from the history alone, as for a fresh session.
    return _embed(
        trained.user_tower,
        np.full(len(chosen), -1, dtype=np.int64),
        [all_histories[n] for n in chosen],
        trained.tower_config.history_length,
    )


def train_two_tower(
    interactions: Interactions,
    config: TrainingConfig = TrainingConfig(model="two_tower"),
    *,
    on_step: StepCallback | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainedModel:
    """Train on the holdout's fit part with early stopping, evaluate the best epoch
    against popularity and item-kNN on the holdout, then refit on all the data for the
    best epoch's count."""
    started = time.monotonic()
    if config.threads:
        torch.set_num_threads(config.threads)
    fit, eval_set = _holdout(interactions, config)
    tower_config = TowerConfig(
        num_users=interactions.num_users,
        num_items=interactions.num_items,
        num_categories=interactions.num_categories,
        dim=config.dim,
        hidden=config.hidden,
        history_length=config.history_length,
    )
    reports: list[EpochReport] = []
    model, best_epoch, best_scores = _run_epochs(
        fit,
        interactions,
        tower_config,
        config,
        config.max_epochs,
        eval_set,
        reports,
        on_step,
        on_epoch,
    )
    if config.refit:
        model, _, _ = _run_epochs(
            interactions,
            interactions,
            tower_config,
            config,
            best_epoch,
            None,
            reports,
            on_step,
            on_epoch,
        )
    model.eval()
    item_embeddings = model.all_item_embeddings(interactions.item_category)
    metrics = {
        "two_tower": best_scores,
        **_peers(fit, eval_set),
        "protocol": _protocol(interactions, fit, eval_set),
        "training": {
            "model": "two_tower",
            "best_epoch": best_epoch,
            "epochs_run": sum(not r.refit for r in reports),
            "refit_epochs": sum(r.refit for r in reports),
            "early_stopping_metric": EARLY_STOPPING_METRIC,
            "seconds": round(time.monotonic() - started, 2),
            "examples": len(interactions),
            "config": asdict(config),
        },
    }
    metrics = _json_safe(metrics)
    trained = TrainedModel(
        config=config,
        tower_config=tower_config,
        user_tower=model.user_tower,
        interactions=interactions,
        item_embeddings=item_embeddings,
        query_sample=np.zeros((0, config.dim), np.float32),
        metrics=metrics,
        epochs=reports,
    )
    trained.query_sample = _query_sample(trained, user_histories(interactions), config.seed)
    return trained


def _run_epochs(
    train: Interactions,
    everything: Interactions,
    tower_config: TowerConfig,
    config: TrainingConfig,
    epochs: int,
    eval_set: EvaluationSet | None,
    reports: list[EpochReport],
    on_step: StepCallback | None,
    on_epoch: EpochCallback | None,
) -> tuple[TwoTowerModel, int, dict[str, float]]:
    """Train a fresh model on `train` for up to `epochs`; with `eval_set`, stop early and
    return the best epoch's state. (model, best epoch, its validation metrics)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    examples = training_examples(train, config.history_length)
    counts = train.item_counts()
    log_q = torch.as_tensor(np.log(np.maximum(counts, 1) / counts.sum()), dtype=torch.float32)
    model = TwoTowerModel(tower_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    categories = torch.as_tensor(everything.item_category, dtype=torch.long)

    n = len(examples.item)
    steps = max(1, int(np.ceil(n / config.batch_size)))
    best_value, best_state, best_epoch, stale = -1.0, None, epochs, 0
    best_scores: dict[str, float] = {}
    for epoch in range(1, epochs + 1):
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

        scores: dict[str, float] = {}
        if eval_set is not None:
            item_embeddings = model.all_item_embeddings(everything.item_category)
            scores = evaluate(
                _tower_scorer(model, item_embeddings, config.history_length), eval_set
            )
        report = EpochReport(
            epoch,
            total_loss / steps,
            scores,
            time.monotonic() - epoch_start,
            refit=eval_set is None,
        )
        reports.append(report)
        if on_epoch:
            on_epoch(report)
        if eval_set is None:
            continue
        if scores[EARLY_STOPPING_METRIC] > best_value:
            best_value, best_epoch, best_scores, stale = (
                scores[EARLY_STOPPING_METRIC],
                epoch,
                scores,
                0,
            )
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience and epoch >= config.min_epochs:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, best_epoch, best_scores


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


def _json_safe(value: Any) -> Any:
    """Metrics as JSON gives them back: lists for tuples, "inf" for infinity (which
    strict JSON lacks), so metrics.json and the manifest compare equal to these."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def _protocol(
    interactions: Interactions, fit: Interactions, eval_set: EvaluationSet
) -> dict[str, Any]:
    return {
        "split": "per-user chronological holdout of the training data (last 20% per user)",
        "interactions": len(interactions),
        "fit_interactions": len(fit),
        "validation_interactions": len(interactions) - len(fit),
        "users": interactions.num_users,
        "items": interactions.num_items,
        "users_evaluated": len(eval_set),
        "seen_items_excluded": True,
    }
