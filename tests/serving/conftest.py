"""Tiny synthetic models for the serving tests, built once per test session (worker).

Two versions of one model: version 1 has an exact (Flat) index, version 2 is trained
with another seed and has an HNSW index, so the two answer differently.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_model import TinyModel, pack

from model_handlers.archive import BuiltArchive
from model_handlers.interactions import Interactions
from model_handlers.model_directory import write_trained_model
from model_handlers.synthetic import SyntheticConfig, SyntheticWorld
from model_handlers.training import TrainedModel, TrainingConfig
from recsys_operator.api.recommender_system import IndexSpec

from .reference import BruteForce, unpack

MODEL_NAME = "retrieval"
TOP_K = 50
TINY_WORLD = SyntheticConfig(users=1000, items=2000, categories=10, latent_dim=16, seed=7)
TINY_TRAINING = TrainingConfig(
    dim=16, hidden=32, history_length=10, batch_size=256, max_epochs=3, patience=1, threads=1
)
TINY = TinyModel(world=TINY_WORLD, training=TINY_TRAINING)
INDEXES = {
    "1": IndexSpec(type="Flat"),
    "2": IndexSpec.model_validate({"type": "HNSW", "hnsw": {"m": 16, "efSearch": 64}}),
}


@pytest.fixture(scope="session")
def tiny_world() -> SyntheticWorld:
    return SyntheticWorld(TINY_WORLD)


@pytest.fixture(scope="session")
def tiny_log(tiny_world: SyntheticWorld) -> Interactions:
    return tiny_world.interactions()


@pytest.fixture(scope="session")
def trained_models(tiny_log: Interactions) -> dict[str, TrainedModel]:
    """Version -> trained model (version 2: another seed)."""
    return {version: TINY.train(seed=seed, log=tiny_log) for version, seed in (("1", 0), ("2", 1))}


@pytest.fixture(scope="session")
def model_dirs(
    trained_models: dict[str, TrainedModel], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for version, trained in trained_models.items():
        dirs[version] = root / f"v{version}"
        write_trained_model(trained, dirs[version])
    return dirs


@pytest.fixture(scope="session")
def archives(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, BuiltArchive]:
    store = tmp_path_factory.mktemp("model_store")
    return pack(model_dirs, store, name=MODEL_NAME, top_k=TOP_K, index=INDEXES).archives


@pytest.fixture(scope="session")
def model_store(archives: dict[str, BuiltArchive]) -> Path:
    return archives["1"].path.parent


@pytest.fixture(scope="session")
def unpacked(
    archives: dict[str, BuiltArchive], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Version -> the archive unpacked the way TorchServe unpacks it."""
    root = tmp_path_factory.mktemp("unpacked")
    return {v: unpack(a.path, root / f"v{v}") for v, a in archives.items()}


@pytest.fixture(scope="session")
def brute_force(unpacked: dict[str, Path]) -> dict[str, BruteForce]:
    return {v: BruteForce(d) for v, d in unpacked.items()}
