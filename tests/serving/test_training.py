"""The two-tower trainer: examples, loss, early stopping, and that it learns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from model_handlers.interactions import Interactions, from_id_columns
from model_handlers.training import TrainedModel, _in_batch_softmax_loss, training_examples

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


def test_early_stopping_keeps_the_best_epoch(trained_models: dict[str, TrainedModel]) -> None:
    trained = trained_models["1"]
    training = trained.metrics["training"]
    assert 1 <= training["best_epoch"] <= training["epochs_run"] <= TINY_TRAINING.max_epochs
    best = max(trained.epochs, key=lambda report: report.validation["recall@50"])
    assert best.epoch == training["best_epoch"]
    assert trained.metrics["two_tower"]["recall@50"] == best.validation["recall@50"]


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
