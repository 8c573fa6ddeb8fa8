"""The two-tower retrieval model.

- User tower: the user's id embedding and the mean of the embeddings of the items the
  user touched most recently, through a small MLP. Row 0 of the user table is the
  *unknown user*: training sometimes hides the id, so the tower also embeds a user it
  has never seen from recent items alone.
- Item tower: the item's id embedding and its category's embedding, through an MLP.

Both outputs are L2-normalised, so the inner product the FAISS index searches is the
cosine similarity. Serving needs only the user tower plus the item embeddings it
produced (`item_embeddings.npy`), which is what the archive holds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

UNKNOWN_USER_ROW = 0
PADDING_ROW = 0


@dataclass(frozen=True)
class TowerConfig:
    """Shapes of the two towers."""

    num_users: int
    num_items: int
    num_categories: int
    dim: int = 64
    hidden: int = 128
    history_length: int = 20
    """How many recent items the user tower pools."""
    kind: str = "two_tower"
    """`two_tower` (this module's towers) or `ease` (`ease.EaseUserTower`)."""
    recency_half_life: float = float("inf")
    """ease: history positions at which an item's weight halves."""
    recency_floor: float = 0.0
    """ease: the weight an old item keeps."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TowerConfig:
        return cls(**json.loads(text))


def user_rows(user_indices: np.ndarray) -> np.ndarray:
    """Rows of the user table for user indices; -1 (unknown) maps to the unknown-user row."""
    return np.where(user_indices >= 0, user_indices + 1, UNKNOWN_USER_ROW).astype(np.int64)


def history_rows(histories: list[np.ndarray], length: int) -> np.ndarray:
    """A (users, length) matrix of history-table rows: the most recent `length` item
    indices of each history (given oldest first), padded with the padding row."""
    out = np.full((len(histories), length), PADDING_ROW, dtype=np.int64)
    for n, items in enumerate(histories):
        recent = np.asarray(items[-length:], dtype=np.int64) if length else items[:0]
        out[n, : len(recent)] = recent + 1
    return out


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


class UserTower(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.config = config
        self.user_embedding = nn.Embedding(config.num_users + 1, config.dim)
        self.history_embedding = nn.Embedding(
            config.num_items + 1, config.dim, padding_idx=PADDING_ROW
        )
        self.mlp = _mlp(2 * config.dim, config.hidden, config.dim)
        nn.init.normal_(self.user_embedding.weight, std=0.05)
        nn.init.normal_(self.history_embedding.weight, std=0.05)
        with torch.no_grad():
            self.history_embedding.weight[PADDING_ROW].zero_()

    def forward(self, users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """`users`: (B,) user rows; `history`: (B, L) history rows -> (B, dim), unit norm."""
        mask = (history != PADDING_ROW).unsqueeze(-1).to(self.history_embedding.weight.dtype)
        pooled = (self.history_embedding(history) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        x = torch.cat([self.user_embedding(users), pooled], dim=-1)
        return F.normalize(self.mlp(x), dim=-1)


class ItemTower(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.item_embedding = nn.Embedding(config.num_items, config.dim)
        self.category_embedding = nn.Embedding(max(1, config.num_categories), config.dim)
        self.mlp = _mlp(2 * config.dim, config.hidden, config.dim)
        nn.init.normal_(self.item_embedding.weight, std=0.05)
        nn.init.normal_(self.category_embedding.weight, std=0.05)

    def forward(self, items: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.item_embedding(items), self.category_embedding(categories)], dim=-1)
        return F.normalize(self.mlp(x), dim=-1)


class TwoTowerModel(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.config = config
        self.user_tower = UserTower(config)
        self.item_tower = ItemTower(config)

    @torch.no_grad()
    def all_item_embeddings(self, item_category: np.ndarray, batch: int = 65_536) -> np.ndarray:
        """Embeddings of every item (float32, (num_items, dim)), in item-index order."""
        was_training = self.training
        self.eval()
        categories = torch.as_tensor(item_category, dtype=torch.long)
        parts = []
        for lo in range(0, self.config.num_items, batch):
            items = torch.arange(lo, min(lo + batch, self.config.num_items))
            parts.append(self.item_tower(items, categories[lo : lo + batch]))
        self.train(was_training)
        return torch.cat(parts).numpy().astype(np.float32)


# --- files ------------------------------------------------------------------------

USER_TOWER_WEIGHTS = "user_tower.pt"
USER_TOWER_CONFIG = "user_tower.json"


def save_user_tower(tower: nn.Module, directory: Path) -> None:
    """The tower as a plain state dict plus its config (no pickled code)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(tower.state_dict(), directory / USER_TOWER_WEIGHTS)
    config: TowerConfig = tower.config  # type: ignore[assignment]
    (directory / USER_TOWER_CONFIG).write_text(config.to_json() + "\n")


def make_user_tower(config: TowerConfig) -> nn.Module:
    """An untrained user tower of the config's kind."""
    if config.kind == "ease":
        from model_handlers.ease import EaseUserTower

        return EaseUserTower(config)
    if config.kind != "two_tower":
        raise ValueError(f"unknown user tower kind {config.kind!r} in {USER_TOWER_CONFIG}")
    return UserTower(config)


def load_user_tower(directory: Path) -> nn.Module:
    config = TowerConfig.from_json((directory / USER_TOWER_CONFIG).read_text())
    tower = make_user_tower(config)
    state = torch.load(directory / USER_TOWER_WEIGHTS, map_location="cpu", weights_only=True)
    tower.load_state_dict(state)
    return tower.eval()


def quantize_user_tower(tower: nn.Module) -> nn.Module:
    """int8 dynamic quantization of the tower's linear layers (CPU inference)."""
    import warnings

    with warnings.catch_warnings():
        # torch.ao dynamic quantization still works but announces its move to torchao.
        warnings.simplefilter("ignore")
        quantized: nn.Module = torch.ao.quantization.quantize_dynamic(
            tower, {nn.Linear}, dtype=torch.qint8
        )
    return quantized.eval()
