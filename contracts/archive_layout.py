"""What a model directory and a model archive (`.mar`) hold, file by file.

The trainer writes a *model directory*; `recsys archive` adds the FAISS index and
`manifest.json` and packs it, with the handler, into `<name>-<version>.mar`. TorchServe
unpacks the archive into a folder with the same files, which the handler loads.

| file | written by | content |
|---|---|---|
| `user_tower.pt`, `user_tower.json` | trainer | user tower state dict and its shapes |
| `user_ids.json` | trainer | known user ids; position + 1 is the tower row |
| `item_ids.json` | trainer | item ids in index order (FAISS id = position) |
| `item_embeddings.npy` | trainer | float32 (items, dim), unit norm: the vectors the index holds; the stream job updates online user embeddings with them |
| `popularity.json` | trainer | most interacted items first, with counts (cold start) |
| `metrics.json` | trainer | offline evaluation against popularity and item-kNN |
| `query_sample.npy` | trainer | user-tower outputs for validation users (index recall queries) |
| `item_index.faiss` | archive | the FAISS index (inner product) |
| `manifest.json` | archive | name, version, dimensions, index parameters and recall, metrics |

This module is deliberately light (no torch, no FAISS): the operator imports it to
name archives, and local mode to find their files.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from recsys_contracts.index_spec import IndexSpec

USER_TOWER_WEIGHTS = "user_tower.pt"
USER_TOWER_CONFIG = "user_tower.json"
USER_IDS = "user_ids.json"
ITEM_IDS = "item_ids.json"
ITEM_EMBEDDINGS = "item_embeddings.npy"
POPULARITY = "popularity.json"
TRAINING_METRICS = "metrics.json"
QUERY_SAMPLE = "query_sample.npy"
ITEM_INDEX = "item_index.faiss"
MANIFEST = "manifest.json"

TRAINED_MODEL_FILES = (
    USER_TOWER_WEIGHTS,
    USER_TOWER_CONFIG,
    USER_IDS,
    ITEM_IDS,
    ITEM_EMBEDDINGS,
    POPULARITY,
    TRAINING_METRICS,
)
"""Files `recsys archive` needs in a model directory (`query_sample.npy` is optional)."""

ARCHIVE_FILES = (*TRAINED_MODEL_FILES, ITEM_INDEX, MANIFEST)
"""Files every archive holds besides the handler and TorchServe's MAR-INF."""

HANDLER_FILE = "torchserve_handler.py"
"""The handler module inside the archive (a copy of model_handlers/torchserve_handler.py)."""


def mar_file_name(model_name: str, version: str) -> str:
    """File name of the archive of one model version in a model store."""
    return f"{model_name}-{version}.mar"


class IndexReport(BaseModel):
    """How the index was built and how well it finds the exact top 10."""

    model_config = ConfigDict(extra="forbid")

    recall_at_10: float
    """Share of the exact top 10 (flat inner-product search) the index returns."""
    queries: int
    """Held-out queries the recall was measured on."""
    query_source: Literal["validation_users", "user_histories", "perturbed_items"]
    build_seconds: float
    device: str = "cpu"


class ServingDefaults(BaseModel):
    """Settings the handler uses when its environment does not give them."""

    model_config = ConfigDict(extra="forbid")

    redis_url: str | None = None
    """Feature store URL; none means no online features (request and popularity only)."""
    system_id: str | None = None
    """`<namespace>.<name>` of the RecommenderSystem, the prefix of the feature keys."""
    quantize_tower: bool = False
    """Run the user tower with int8 dynamic quantization."""


class ArchiveManifest(BaseModel):
    """`manifest.json`: what the archive holds and how it was made."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    model_name: str
    model_version: str
    created_at: str
    embedding_dim: int
    num_items: int
    num_users: int
    history_length: int
    top_k: int
    """Largest k a request may ask for (and the default)."""
    index: IndexSpec
    index_report: IndexReport
    training_metrics: dict[str, Any] = Field(default_factory=dict)
    serving: ServingDefaults = Field(default_factory=ServingDefaults)
    software: dict[str, str] = Field(default_factory=dict)
