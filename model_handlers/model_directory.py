"""Reading and writing the files of a model directory (layout in `archive_layout`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model_handlers.two_tower import save_user_tower
from recsys_contracts import archive_layout as files

if TYPE_CHECKING:
    from model_handlers.training import TrainedModel

POPULARITY_KEPT = 10_000
"""Most popular items kept for cold start: enough for any k plus exclusions."""


def write_trained_model(trained: TrainedModel, directory: Path) -> None:
    """Everything `recsys archive` needs, from a trained model."""
    directory.mkdir(parents=True, exist_ok=True)
    save_user_tower(trained.user_tower, directory)
    log = trained.interactions
    _write_json(directory / files.USER_IDS, log.user_ids)
    _write_json(directory / files.ITEM_IDS, log.item_ids)
    np.save(directory / files.ITEM_EMBEDDINGS, trained.item_embeddings.astype(np.float32))
    np.save(directory / files.QUERY_SAMPLE, trained.query_sample.astype(np.float32))
    counts = log.item_counts()
    order = np.argsort(-counts, kind="stable")[:POPULARITY_KEPT]
    _write_json(
        directory / files.POPULARITY,
        {"item_ids": [log.item_ids[i] for i in order], "counts": counts[order].tolist()},
    )
    _write_json(directory / files.TRAINING_METRICS, trained.metrics)


@dataclass(frozen=True)
class Popularity:
    item_ids: list[str]
    """Most interacted first."""
    counts: list[int]


def missing_files(directory: Path) -> list[str]:
    """Model-directory files that `directory` lacks."""
    return [name for name in files.TRAINED_MODEL_FILES if not (directory / name).is_file()]


def read_item_ids(directory: Path) -> list[str]:
    return [str(i) for i in json.loads((directory / files.ITEM_IDS).read_text())]


def read_user_ids(directory: Path) -> list[str]:
    return [str(u) for u in json.loads((directory / files.USER_IDS).read_text())]


def read_item_embeddings(directory: Path, *, mmap: bool = False) -> np.ndarray:
    return np.load(directory / files.ITEM_EMBEDDINGS, mmap_mode="r" if mmap else None)


def read_query_sample(directory: Path) -> np.ndarray | None:
    path = directory / files.QUERY_SAMPLE
    return np.load(path) if path.is_file() else None


def read_popularity(directory: Path) -> Popularity:
    data = json.loads((directory / files.POPULARITY).read_text())
    return Popularity(item_ids=[str(i) for i in data["item_ids"]], counts=list(data["counts"]))


def read_training_metrics(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / files.TRAINING_METRICS).read_text())
    return data


def read_manifest(directory: Path) -> files.ArchiveManifest:
    return files.ArchiveManifest.model_validate_json((directory / files.MANIFEST).read_text())


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")
