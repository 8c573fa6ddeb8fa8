"""The two-tower trainer: examples, loss, early stopping, and that it learns."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model_handlers.interactions import Interactions, from_id_columns
from model_handlers.training import (
    TrainedModel,
    TrainingConfig,
    _in_batch_softmax_loss,
    train_model,
    train_two_tower,
    training_examples,
)

from .conftest import TINY_TRAINING


def test_examples_carry_the_items_touched_just_before() -> None:
    log = from_id_columns(
        np.array(["a", "a", "a", "b", "a"]),
        np.array(["p", "q", "r", "p", "s"]),
        np.array([1, 2, 3, 4, 5]),
    )
    examples = training_examples(log, history_length=2)
    row = {
        log.item_ids[i]: n
        for n, i in enumerate(examples.item)
        if log.user_ids[examples.user[n]] == "a"
    }
    position = {
        item: n + 1 for n, item in enumerate(log.item_ids)
    }  # history rows are shifted by one
    assert examples.history[row["p"]].tolist() == [0, 0]
    assert examples.history[row["q"]].tolist() == [position["p"], 0]
    assert sorted(examples.history[row["s"]].tolist()) == sorted([position["r"], position["q"]])


def test_a_repeated_item_in_a_batch_is_not_its_own_negative() -> None:
    users = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    index = torch.tensor([7, 7, 3, 1])
    log_q = torch.log(torch.full((10,), 0.1))
    loss = _in_batch_softmax_loss(users, items, index, log_q, 0.05)
    assert torch.isfinite(loss)
    # With the duplicate masked, a batch of two copies of one item has zero loss.
    same = _in_batch_softmax_loss(
        users[:2], items[:1].repeat(2, 1), torch.tensor([5, 5]), log_q, 0.05
    )
    assert same.item() == 0.0


def test_the_trained_model_beats_popularity(trained_models: dict[str, TrainedModel]) -> None:
    metrics = trained_models["1"].metrics
    for name, factor in (("recall@10", 1.3), ("recall@50", 1.15), ("ndcg@10", 1.3)):
        assert metrics["two_tower"][name] > factor * metrics["popularity"][name], name
    assert metrics["protocol"]["users_evaluated"] > 100


def test_early_stopping_picks_the_best_epoch_and_the_refit_runs_that_many(
    trained_models: dict[str, TrainedModel],
) -> None:
    trained = trained_models["1"]
    training = trained.metrics["training"]
    assert 1 <= training["best_epoch"] <= training["epochs_run"] <= TINY_TRAINING.max_epochs
    validated = [r for r in trained.epochs if not r.refit]
    best = max(validated, key=lambda report: report.validation["recall@50"])
    assert best.epoch == training["best_epoch"]
    assert trained.metrics["two_tower"]["recall@50"] == best.validation["recall@50"]
    # The refit trains on all the data (the holdout included) for the chosen epoch count.
    assert training["refit_epochs"] == training["best_epoch"]
    assert [r.epoch for r in trained.epochs if r.refit] == list(range(1, best.epoch + 1))


def test_noise_cannot_stop_training_before_min_epochs(tiny_log: Interactions) -> None:
    # A learning rate of zero: validation never improves after epoch 1.
    config = replace(
        TINY_TRAINING, learning_rate=0.0, max_epochs=4, min_epochs=3, patience=1, refit=False
    )
    trained = train_two_tower(tiny_log, config)
    assert trained.metrics["training"]["epochs_run"] == 3


def test_the_validation_holdout_holds_hundreds_of_users(
    trained_models: dict[str, TrainedModel],
) -> None:
    assert trained_models["1"].metrics["protocol"]["users_evaluated"] > 500


def test_the_model_directory_holds_metrics_next_to_the_model(
    model_dirs: dict[str, Path], trained_models: dict[str, TrainedModel], tiny_log: Interactions
) -> None:
    directory = model_dirs["1"]
    metrics = json.loads((directory / "metrics.json").read_text())
    assert set(metrics) >= {"two_tower", "popularity", "item_knn", "protocol", "training"}
    assert metrics["two_tower"] == trained_models["1"].metrics["two_tower"]
    embeddings = np.load(directory / "item_embeddings.npy")
    assert (
        embeddings.shape == (tiny_log.num_items, TINY_TRAINING.dim)
        and embeddings.dtype == np.float32
    )
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert json.loads((directory / "item_ids.json").read_text()) == tiny_log.item_ids
    popularity = json.loads((directory / "popularity.json").read_text())
    counts = tiny_log.item_counts()
    assert popularity["counts"] == sorted(popularity["counts"], reverse=True)
    assert popularity["counts"][0] == counts.max()


def test_ease_beats_popularity_and_knn_on_the_holdout(tiny_log: Interactions) -> None:
    trained = train_model(tiny_log, TrainingConfig(model="ease"))
    metrics = trained.metrics
    assert metrics["ease"]["ndcg@10"] > 1.3 * metrics["popularity"]["ndcg@10"]
    assert metrics["ease"]["ndcg@10"] > metrics["item_knn"]["ndcg@10"]
    selected = metrics["training"]["selected"]
    grid = TrainingConfig().ease
    assert selected["l2"] in grid.l2_grid and selected["half_life"] in grid.half_life_grid


def test_ease_serves_its_own_scores_as_an_inner_product(tiny_log: Interactions) -> None:
    """The factorised model (query = weighted sum of rows, item vectors in the index)
    ranks like EASE's item-item matrix at full rank."""
    from model_handlers.baselines import EaseBaseline
    from model_handlers.evaluation import top_k_unseen, user_histories

    small = tiny_log.select(tiny_log.item < 300)
    config = TrainingConfig(
        model="ease",
        ease=replace(
            TrainingConfig().ease, l2_grid=(100.0,), half_life_grid=(float("inf"),), rank=300
        ),
    )
    trained = train_model(small, config)
    # Distinct items: EASE's history row is binary, the served query sums repeats.
    histories = [np.unique(h) for h in user_histories(small) if len(h)][:50]
    users = np.arange(len(histories))
    served = top_k_unseen(trained.scorer()(users, histories), histories, 10)
    exact = top_k_unseen(EaseBaseline(small, l2=100.0)(users, histories), histories, 10)
    overlap = [len(set(a) & set(b)) / 10 for a, b in zip(served, exact, strict=True)]
    assert np.mean(overlap) > 0.98


def test_string_ids_round_trip_to_the_model_directory(tmp_path: Path) -> None:
    from model_handlers.interaction_files import load_interactions
    from model_handlers.model_directory import write_trained_model

    rng = np.random.default_rng(0)
    lines = ["user_id,item_id,timestamp"]
    for n in range(3000):
        lines.append(f"user-{rng.integers(60):02d},sku/{rng.integers(80)}-é,{1_700_000_000 + n}")
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log = load_interactions(path)
    write_trained_model(train_model(log), tmp_path / "model")
    items = json.loads((tmp_path / "model" / "item_ids.json").read_text())
    users = json.loads((tmp_path / "model" / "user_ids.json").read_text())
    assert set(items) == {line.split(",")[1] for line in lines[1:]}
    assert set(users) == {line.split(",")[0] for line in lines[1:]}
