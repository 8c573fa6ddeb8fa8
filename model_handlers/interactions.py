"""A log of user-item interactions: the one data shape that the synthetic generator and
the MovieLens loader produce, and that the trainer and the evaluation read.

External ids (strings) are mapped to dense indices once, here; everything downstream
works with the indices and maps back only at the edges (the archive, the handler).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

UNKNOWN_CATEGORY = "unknown"


@dataclass(frozen=True)
class Interactions:
    """Interactions as parallel arrays, plus the id vocabularies the indices refer to.

    Row `r` says: user `user_ids[user[r]]` interacted with item `item_ids[item[r]]` at
    `timestamp_ms[r]`, in session `session[r]` (-1 when unknown), looking at it for
    `dwell_ms[r]` milliseconds (0 when unknown).
    """

    user_ids: list[str]
    item_ids: list[str]
    item_category: np.ndarray
    """Category index of every item (into `category_names`)."""
    category_names: list[str]
    user: np.ndarray
    item: np.ndarray
    timestamp_ms: np.ndarray
    session: np.ndarray
    dwell_ms: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.user)
        for name in ("item", "timestamp_ms", "session", "dwell_ms"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"interactions: {name} has {len(getattr(self, name))} rows, user has {n}"
                )
        if len(self.item_category) != len(self.item_ids):
            raise ValueError("interactions: one category per item is needed")
        if n and (self.user.min() < 0 or self.user.max() >= len(self.user_ids)):
            raise ValueError("interactions: a user index is outside the user vocabulary")
        if n and (self.item.min() < 0 or self.item.max() >= len(self.item_ids)):
            raise ValueError("interactions: an item index is outside the item vocabulary")

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_categories(self) -> int:
        return len(self.category_names)

    def __len__(self) -> int:
        return len(self.user)

    def select(self, rows: np.ndarray) -> Interactions:
        """The interactions at `rows` (a boolean mask or indices), same vocabularies."""
        return Interactions(
            user_ids=self.user_ids,
            item_ids=self.item_ids,
            item_category=self.item_category,
            category_names=self.category_names,
            user=self.user[rows],
            item=self.item[rows],
            timestamp_ms=self.timestamp_ms[rows],
            session=self.session[rows],
            dwell_ms=self.dwell_ms[rows],
        )

    def sorted_by_time(self) -> Interactions:
        """Chronological order; ties keep their original order (stable sort)."""
        return self.select(np.argsort(self.timestamp_ms, kind="stable"))

    def item_counts(self) -> np.ndarray:
        """How many interactions each item has (int64, one per item)."""
        return np.bincount(self.item, minlength=self.num_items).astype(np.int64)

    def save(self, path: Path) -> None:
        """Write to one `.npz` file (ids as unicode arrays, no pickling)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(
                f,
                user_ids=np.asarray(self.user_ids, dtype=str),
                item_ids=np.asarray(self.item_ids, dtype=str),
                item_category=self.item_category,
                category_names=np.asarray(self.category_names, dtype=str),
                user=self.user,
                item=self.item,
                timestamp_ms=self.timestamp_ms,
                session=self.session,
                dwell_ms=self.dwell_ms,
            )

    @classmethod
    def load(cls, path: Path) -> Interactions:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                user_ids=[str(u) for u in data["user_ids"]],
                item_ids=[str(i) for i in data["item_ids"]],
                item_category=data["item_category"].astype(np.int32),
                category_names=[str(c) for c in data["category_names"]],
                user=data["user"].astype(np.int32),
                item=data["item"].astype(np.int32),
                timestamp_ms=data["timestamp_ms"].astype(np.int64),
                session=data["session"].astype(np.int32),
                dwell_ms=data["dwell_ms"].astype(np.int32),
            )


def from_id_columns(
    users: np.ndarray,
    items: np.ndarray,
    timestamp_ms: np.ndarray,
    *,
    session: np.ndarray | None = None,
    dwell_ms: np.ndarray | None = None,
) -> Interactions:
    """Interactions from columns of external ids (any type that prints as the id).

    Users and items are numbered in order of first appearance after a stable sort by
    id, so the same file always gives the same indices. Items get the one category
    `unknown`.
    """
    user_vocab, user_index = np.unique(users, return_inverse=True)
    item_vocab, item_index = np.unique(items, return_inverse=True)
    n = len(users)
    return Interactions(
        user_ids=[str(u) for u in user_vocab],
        item_ids=[str(i) for i in item_vocab],
        item_category=np.zeros(len(item_vocab), dtype=np.int32),
        category_names=[UNKNOWN_CATEGORY],
        user=user_index.astype(np.int32),
        item=item_index.astype(np.int32),
        timestamp_ms=np.asarray(timestamp_ms, dtype=np.int64),
        session=np.full(n, -1, dtype=np.int32) if session is None else session.astype(np.int32),
        dwell_ms=np.zeros(n, dtype=np.int32) if dwell_ms is None else dwell_ms.astype(np.int32),
    )
