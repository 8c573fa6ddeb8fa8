"""The synthetic world: deterministic by seed, power-law popularity, drifting interests,
and one ground truth for both the interaction log and click probabilities."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from model_handlers.interactions import Interactions
from model_handlers.synthetic import (
    SyntheticConfig,
    SyntheticWorld,
    load_synthetic_world,
    write_synthetic_dataset,
)

from .conftest import TINY_WORLD

ARRAYS = ("user", "item", "timestamp_ms", "session", "dwell_ms")


def _top_share(log: Interactions, share: float) -> float:
    counts = np.sort(log.item_counts())[::-1]
    return float(counts[: int(len(counts) * share)].sum() / counts.sum())


def test_the_same_seed_gives_the_same_world_and_log(tiny_log: Interactions) -> None:
    again = SyntheticWorld(TINY_WORLD)
    log = again.interactions()
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(log, name), getattr(tiny_log, name))
    assert log.user_ids == tiny_log.user_ids and log.item_ids == tiny_log.item_ids


def test_another_seed_gives_another_log(tiny_log: Interactions) -> None:
    other = SyntheticWorld(replace(TINY_WORLD, seed=TINY_WORLD.seed + 1)).interactions()
    assert not np.array_equal(other.item[:1000], tiny_log.item[:1000])


def test_item_popularity_follows_a_power_law() -> None:
    shares = {
        exponent: _top_share(
            SyntheticWorld(replace(TINY_WORLD, popularity_exponent=exponent)).interactions(), 0.1
        )
        for exponent in (0.0, 1.0, 1.5)
    }
    assert shares[0.0] < shares[1.0] < shares[1.5]
    assert shares[1.0] > 0.4  # uniform popularity would give about 0.1


def test_user_interests_drift_over_the_period() -> None:
    world = SyntheticWorld(replace(TINY_WORLD, drift=1.0))
    log = world.interactions()
    early = log.timestamp_ms < np.quantile(log.timestamp_ms, 0.2)
    late = log.timestamp_ms > np.quantile(log.timestamp_ms, 0.8)

    def match(vectors: np.ndarray, rows: np.ndarray) -> float:
        return float(
            np.mean(
                np.einsum("nd,nd->n", vectors[log.user[rows]], world.item_vectors[log.item[rows]])
            )
        )

    assert match(world.user_start, early) > match(world.user_end, early) + 0.2
    assert match(world.user_end, late) > match(world.user_start, late) + 0.2
    users = np.arange(10)
    still = SyntheticWorld(replace(TINY_WORLD, drift=0.0))
    np.testing.assert_allclose(
        still.preference_vectors(users, still.config.start_ms),
        still.preference_vectors(users, still.end_ms),
        atol=1e-6,
    )


def test_click_probability_comes_from_the_same_truth(
    tiny_world: SyntheticWorld, tiny_log: Interactions
) -> None:
    rows = np.random.default_rng(0).choice(len(tiny_log), 2000, replace=False)
    chosen = tiny_world.click_probability_by_index(
        tiny_log.user[rows], tiny_log.item[rows], tiny_log.timestamp_ms[rows]
    )
    random_items = np.random.default_rng(1).integers(0, tiny_log.num_items, len(rows))
    random = tiny_world.click_probability_by_index(
        tiny_log.user[rows], random_items, tiny_log.timestamp_ms[rows]
    )
    assert ((chosen >= 0) & (chosen <= 1)).all() and ((random >= 0) & (random <= 1)).all()
    assert chosen.mean() > 5 * random.mean()
    by_id = tiny_world.click_probability(
        [tiny_log.user_ids[u] for u in tiny_log.user[rows[:20]]],
        [tiny_log.item_ids[i] for i in tiny_log.item[rows[:20]]],
        tiny_log.timestamp_ms[rows[:20]],
    )
    np.testing.assert_allclose(by_id, chosen[:20])
    with pytest.raises(KeyError):
        tiny_world.click_probability(
            ["no-such-user"], [tiny_log.item_ids[0]], tiny_world.config.start_ms
        )


def test_sessions_have_distinct_items_ordered_times_and_dwell(tiny_log: Interactions) -> None:
    assert (np.diff(tiny_log.timestamp_ms) >= 0).all()
    for session in np.unique(tiny_log.session)[:300]:
        rows = tiny_log.session == session
        assert len(set(tiny_log.item[rows])) == rows.sum()
        assert len(set(tiny_log.user[rows])) == 1
    assert (tiny_log.dwell_ms >= 500).all() and (tiny_log.dwell_ms <= 600_000).all()
    assert set(np.unique(tiny_log.item_category)) <= set(range(TINY_WORLD.categories))


def test_a_written_dataset_loads_back_with_its_ground_truth(
    tmp_path: Path, tiny_world: SyntheticWorld
) -> None:
    config = replace(TINY_WORLD, users=50, items=300)
    log = write_synthetic_dataset(config, tmp_path)
    loaded = Interactions.load(tmp_path / "interactions.npz")
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(log, name))
    assert loaded.item_ids == log.item_ids and loaded.category_names == log.category_names
    world = load_synthetic_world(tmp_path)
    assert world.config == config
    np.testing.assert_array_equal(world.item_vectors, SyntheticWorld(config).item_vectors)


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="drift"):
        SyntheticConfig(drift=1.5)
    with pytest.raises(ValueError, match="users"):
        SyntheticConfig(users=0)
