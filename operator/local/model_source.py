"""Where a local system's model archives come from.

For each version `recsys up` needs `<run>/model-store/<name>-<version>.mar`:

1. `--archive PATH` given on the command line: that archive;
2. `spec.model.archiveUri` that this machine can read (`file://`, or http(s) that
   answers): that archive;
3. otherwise (no archiveUri, `--train`, or an archiveUri this machine cannot reach, such
   as a cluster host name, which is said out loud): a model trained here on the
   synthetic world, with progress, sized by the spec (`numItems`, `embeddingDim`).

`--random-embeddings` builds a deliberately broken version (the trained model with
random item vectors): it ranks at random, which is how the demo shows a rollback.
`history_fraction` below 1 trains on the first part of the synthetic period only: a
stale model, as the continuous-learning demo starts with.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from recsys_operator.api.recommender_system import ModelSpec
from recsys_operator.local.run_folder import RunFolder

if TYPE_CHECKING:
    from model_handlers.synthetic import SyntheticConfig
    from model_handlers.training import EpochReport

Say = Callable[[str], None]

SYNTHETIC_USERS = 2000
SYNTHETIC_SEED = 0
TRAINING_EPOCHS = 3
FETCH_TIMEOUT_S = 10.0


class ModelSourceError(RuntimeError):
    """No archive could be found, fetched or built; the message says why."""


@dataclass(frozen=True)
class PreparedModel:
    version: str
    archive: Path
    origin: str
    """How it was obtained, for the user: a path, a URI, or "trained on synthetic data"."""


def synthetic_world_config(model: ModelSpec) -> SyntheticConfig:
    """The synthetic world a local system trains on and simulated users live in."""
    from model_handlers.synthetic import SyntheticConfig

    return SyntheticConfig(
        users=SYNTHETIC_USERS,
        items=model.num_items or SyntheticConfig.items,
        seed=SYNTHETIC_SEED,
        # A short period with strong drift: interests move while the demo watches.
        drift=0.6,
    )


def prepare_model(
    folder: RunFolder,
    model: ModelSpec,
    *,
    archive: Path | None = None,
    random_embeddings: bool = False,
    train: bool = False,
    history_fraction: float = 1.0,
    say: Say = print,
) -> PreparedModel:
    """Make sure `model.version` has an archive in the run folder's model store."""
    target = folder.archive(model.name, model.version)
    folder.model_store.mkdir(parents=True, exist_ok=True)
    if history_fraction < 1.0:
        target.with_suffix(".spec.json").unlink(missing_ok=True)  # not the spec's model
        _build(_trained_model(folder, model, say, history_fraction), folder, model, say)
        return _linked(
            folder,
            PreparedModel(
                model.version, target, f"trained on the first {history_fraction:.0%} of the period"
            ),
        )
    if archive is not None or random_embeddings:
        # Not what the spec describes: never reused for it by a later run.
        target.with_suffix(".spec.json").unlink(missing_ok=True)
    if archive is not None:
        if not archive.is_file():
            raise ModelSourceError(f"--archive {archive}: no such file")
        _copy(archive, target)
        return _linked(folder, PreparedModel(model.version, target, str(archive)))
    if random_embeddings:
        model_dir = _trained_model(folder, model, say)
        broken = folder.trained / f"random-{model.version}"
        _randomize_item_embeddings(model_dir, broken)
        _build(broken, folder, model, say)
        return _linked(
            folder, PreparedModel(model.version, target, "trained, with random item embeddings")
        )
    if target.is_file() and _built_for(target) == _shape(model):
        return _linked(folder, PreparedModel(model.version, target, str(target)))
    uri = None if train else model.archive_uri
    if uri:
        problem = _fetch(uri, target)
        if problem is None:
            _record_shape(target, model)
            return _linked(folder, PreparedModel(model.version, target, uri))
        say(
            f"warning: spec.model.archiveUri {uri} cannot be read from this machine ({problem}); "
            "training a model on synthetic data instead (--archive PATH uses your own)"
        )
    model_dir = _trained_model(folder, model, say)
    _build(model_dir, folder, model, say)
    _record_shape(target, model)
    return _linked(folder, PreparedModel(model.version, target, "trained on synthetic data"))


def _shape(model: ModelSpec) -> dict[str, object]:
    """What an archive in the store was made for; another shape means a new archive."""
    return model.model_dump(
        mode="json",
        include={"name", "version", "archive_uri", "embedding_dim", "num_items", "top_k", "index"},
    )


def _built_for(archive: Path) -> dict[str, object] | None:
    import json

    try:
        shape: dict[str, object] = json.loads(archive.with_suffix(".spec.json").read_text())
    except (OSError, ValueError):
        return None
    return shape


def _record_shape(archive: Path, model: ModelSpec) -> None:
    import json

    archive.with_suffix(".spec.json").write_text(json.dumps(_shape(model), sort_keys=True))


def _copy(source: Path, target: Path) -> None:
    if source.resolve() != target.resolve():
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(target)


def _linked(folder: RunFolder, prepared: PreparedModel) -> PreparedModel:
    link_embeddings(folder, prepared.version, prepared.archive)
    return prepared


def link_embeddings(folder: RunFolder, version: str, archive: Path) -> None:
    """The feature job finds each served version's item vectors as embeddings/<version>.mar."""
    folder.embeddings.mkdir(parents=True, exist_ok=True)
    link = folder.embeddings / f"{version}.mar"
    link.unlink(missing_ok=True)
    link.symlink_to(archive.resolve())


def _fetch(uri: str, target: Path) -> str | None:
    """Copy or download the archive to `target`; None on success, else what went wrong."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        source = Path(parsed.path)
        if not source.is_file():
            return f"no such file {source}"
        _copy(source, target)
        return None
    if parsed.scheme in ("http", "https"):
        tmp = target.with_name(target.name + ".download")
        try:
            with urllib.request.urlopen(uri, timeout=FETCH_TIMEOUT_S) as response:
                tmp.write_bytes(response.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            tmp.unlink(missing_ok=True)
            return str(getattr(exc, "reason", exc))
        tmp.replace(target)
        return None
    return f"{parsed.scheme}:// archives are fetched only in a cluster"


def history_cut_ms(model: ModelSpec, history_fraction: float) -> int:
    """The moment `history_fraction` of the synthetic period has passed."""
    from model_handlers.synthetic import SyntheticWorld

    world = SyntheticWorld(synthetic_world_config(model))
    start = world.config.start_ms
    return start + int(history_fraction * (world.end_ms - start))


def _trained_model(
    folder: RunFolder, model: ModelSpec, say: Say, history_fraction: float = 1.0
) -> Path:
    """A model trained on the synthetic world (its first `history_fraction` of the
    period), reused when one of this shape exists."""
    from model_handlers.model_directory import missing_files, write_trained_model
    from model_handlers.synthetic import SyntheticWorld
    from model_handlers.training import TrainingConfig, train_two_tower

    # Each version is its own training run (its own seed) on the same synthetic data.
    seed = zlib.crc32(model.version.encode()) % 10_000
    config = synthetic_world_config(model)
    model_dir = folder.trained / f"items{config.items}-dim{model.embedding_dim}-seed{seed}"
    if history_fraction < 1.0:
        model_dir = model_dir.with_name(f"{model_dir.name}-first{history_fraction:g}")
    if model_dir.is_dir() and not missing_files(model_dir):
        return model_dir
    say(f"training a model on synthetic data ({SYNTHETIC_USERS} users, {config.items} items)")
    interactions = SyntheticWorld(config).interactions()
    if history_fraction < 1.0:
        cut = history_cut_ms(model, history_fraction)
        interactions = interactions.select(interactions.timestamp_ms < cut)

    def on_epoch(report: EpochReport) -> None:
        if report.refit:  # the refit on all data has no validation
            say(f"  refit on all data, epoch {report.epoch} ({report.seconds:.0f}s)")
            return
        say(
            f"  epoch {report.epoch}/{TRAINING_EPOCHS}: "
            f"validation recall@50 {report.validation['recall@50']:.3f} ({report.seconds:.0f}s)"
        )

    trained = train_two_tower(
        interactions,
        TrainingConfig(
            dim=model.embedding_dim,
            hidden=2 * model.embedding_dim,
            max_epochs=TRAINING_EPOCHS,
            patience=TRAINING_EPOCHS,
            batch_size=512,
            seed=seed,
            # Demo data: keep `recsys up` as quick as before (no second pass on all data).
            refit=False,
        ),
        on_epoch=on_epoch,
    )
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_trained_model(trained, tmp)
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
    return model_dir


def _randomize_item_embeddings(model_dir: Path, out: Path) -> None:
    import numpy as np

    from recsys_contracts.archive_layout import ITEM_EMBEDDINGS

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(model_dir, out)
    vectors = np.load(model_dir / ITEM_EMBEDDINGS)
    noise = np.random.default_rng(3).normal(size=vectors.shape).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)  # unit norm, like trained vectors
    np.save(out / ITEM_EMBEDDINGS, noise)


def _build(model_dir: Path, folder: RunFolder, model: ModelSpec, say: Say) -> None:
    from model_handlers.archive import ArchiveRequest, build_archive

    say(f"building archive {model.name}-{model.version}.mar ({model.index.type} index)")
    build_archive(
        ArchiveRequest(
            model_dir=model_dir,
            out_dir=folder.model_store,
            name=model.name,
            version=model.version,
            index=model.index,
            top_k=model.top_k,
            force=True,
        )
    )
