"""Small two-tower models and their archives, for the tests and benchmarks that serve one.

One way to make them, so that every caller trains with the project's own trainer and
packs with its own archiver, and says only what differs: the synthetic world, the
training settings, the versions and their indexes. The defaults train in a few seconds
on one core.

    tiny = TinyModel()
    store = pack({"1": tiny.write(root / "model")}, root / "store", name="recs", top_k=20)
    store.model_spec("1")  # the ModelSpec that serves it (file:// archive URI)

Benchmarks import it too (they put tests/ on the import path, as they do for kubemock).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from model_handlers.archive import ArchiveRequest, BuiltArchive, build_archive
from model_handlers.interactions import Interactions
from model_handlers.model_directory import write_trained_model
from model_handlers.synthetic import SyntheticConfig, SyntheticWorld
from model_handlers.training import TrainedModel, TrainingConfig, train_two_tower
from recsys_contracts.index_spec import IndexSpec
from recsys_operator.api.recommender_system import ModelSpec

FLAT = IndexSpec(type="Flat")


@dataclass(frozen=True)
class TinyModel:
    """What to train: a small synthetic world and training settings that finish fast."""

    world: SyntheticConfig = field(
        default_factory=lambda: SyntheticConfig(users=200, items=300, sessions_per_user=2)
    )
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(
            dim=16, hidden=32, max_epochs=1, batch_size=256, max_eval_users=100, threads=1
        )
    )

    def interactions(self) -> Interactions:
        return SyntheticWorld(self.world).interactions()

    def train(self, *, seed: int | None = None, log: Interactions | None = None) -> TrainedModel:
        """Train on the world's interactions (or `log`, when the caller already has them);
        `seed` replaces the training seed, for a second model that answers differently."""
        config = self.training if seed is None else replace(self.training, seed=seed)
        return train_two_tower(self.interactions() if log is None else log, config)

    def write(self, model_dir: Path, *, seed: int | None = None) -> Path:
        """Train, then write the model directory the archiver reads; returns `model_dir`."""
        write_trained_model(self.train(seed=seed), model_dir)
        return model_dir


@dataclass(frozen=True)
class ModelStore:
    """A folder of archives, one per version of one model, as TorchServe's model store."""

    path: Path
    name: str
    archives: dict[str, BuiltArchive]

    def model_spec(self, version: str) -> ModelSpec:
        """The API's ModelSpec for serving `version` of this store, read from its manifest."""
        archive = self.archives[version]
        manifest = archive.manifest
        return ModelSpec(
            name=self.name,
            version=version,
            archive_uri=f"file://{archive.path}",
            embedding_dim=manifest.embedding_dim,
            num_items=manifest.num_items,
            top_k=manifest.top_k,
            index=manifest.index,
        )


def pack(
    model_dirs: Mapping[str, Path],
    store: Path,
    *,
    name: str,
    top_k: int,
    index: IndexSpec | Mapping[str, IndexSpec] = FLAT,
) -> ModelStore:
    """Pack each version's model directory into `store` (made if missing), with one index
    for all versions or one per version."""
    store.mkdir(parents=True, exist_ok=True)
    archives = {
        version: build_archive(
            ArchiveRequest(
                model_dir=model_dir,
                out_dir=store,
                name=name,
                version=version,
                index=index if isinstance(index, IndexSpec) else index[version],
                top_k=top_k,
            )
        )
        for version, model_dir in model_dirs.items()
    }
    return ModelStore(store, name, archives)
