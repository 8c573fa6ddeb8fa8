"""Independent reference answers for the serving tests: brute force over the archive's
files with numpy, sharing nothing with the retriever but the trained user tower."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model_handlers.session_rerank import SessionStage
from model_handlers.two_tower import load_user_tower


class BruteForce:
    """Exact answers of one unpacked archive (or model directory)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.items = json.loads((directory / "item_ids.json").read_text())
        self.position = {item: n for n, item in enumerate(self.items)}
        self.users = {
            u: n + 1 for n, u in enumerate(json.loads((directory / "user_ids.json").read_text()))
        }
        self.embeddings = np.load(directory / "item_embeddings.npy")
        self.tower = load_user_tower(directory)
        self.history_length = self.tower.config.history_length
        popularity = json.loads((directory / "popularity.json").read_text())
        self.popular = popularity["item_ids"]
        self.log_count = np.zeros(len(self.items))
        for item, count in zip(popularity["item_ids"], popularity["counts"], strict=True):
            self.log_count[self.position[item]] = np.log1p(count)
        self.session = SessionStage()  # the handler's default; tests may replace it

    def query(self, user_id: str | None, recent: Sequence[str]) -> np.ndarray:
        """The user tower's vector for a user id and recent items (newest first)."""
        rows = [self.position[i] + 1 for i in recent if i in self.position][: self.history_length]
        history = torch.zeros((1, self.history_length), dtype=torch.long)
        history[0, : len(rows)] = torch.tensor(rows, dtype=torch.long)
        user = torch.tensor([self.users.get(user_id, 0) if user_id else 0])
        with torch.no_grad():
            return self.tower(user, history)[0].numpy()

    def top_k(
        self, query: np.ndarray, k: int, blocked: Sequence[str] = ()
    ) -> tuple[list[str], np.ndarray]:
        scores = self.embeddings @ (query / np.linalg.norm(query))
        for item in blocked:
            if item in self.position:
                scores[self.position[item]] = -np.inf
        order = np.argsort(-scores, kind="stable")[:k]
        return [self.items[i] for i in order], scores[order]

    def ranked(
        self, user_id: str | None, recent: Sequence[str], k: int, blocked: Sequence[str] = ()
    ) -> tuple[list[str], np.ndarray]:
        """The tower's answer for a known user or known recent items, with the session
        stage when there are known recent items: the query plus `weight` times the
        recency-weighted mean of the newest recent items' vectors, its best `candidates`
        re-ranked by score plus `popularity_weight` * log(1 + training count)."""
        query = self.query(user_id, recent)
        known = [self.position[i] for i in recent if i in self.position][: self.history_length]
        stage = self.session
        if not (stage.weight > 0 and stage.items > 0 and known):
            return self.top_k(query, k, blocked)
        newest = known[: stage.items]
        weights = stage.decay ** np.arange(len(newest))
        session = (weights[:, None] * self.embeddings[newest]).sum(0) / weights.sum()
        blended = query / np.linalg.norm(query) + stage.weight * session
        scores = self.embeddings.astype(np.float64) @ blended
        for item in blocked:
            if item in self.position:
                scores[self.position[item]] = -np.inf
        candidates = np.argsort(-scores, kind="stable")[: max(k, stage.candidates)]
        final = scores[candidates] + stage.popularity_weight * self.log_count[candidates]
        order = candidates[np.argsort(-final, kind="stable")[:k]]
        return [self.items[i] for i in order], np.sort(final)[::-1][:k]

    def answer(
        self,
        user_id: str | None,
        *,
        k: int,
        recent: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> list[str]:
        """Item ids the handler should return when the store has nothing for the user."""
        if (user_id is None or user_id not in self.users) and not any(
            i in self.position for i in recent
        ):
            blocked = set(recent) | set(exclude)
            return [i for i in self.popular if i not in blocked][:k]
        return self.ranked(user_id, recent, k, [*recent, *exclude])[0]


def unpack(archive: Path, target: Path) -> Path:
    """Unzip a .mar as TorchServe does."""
    with zipfile.ZipFile(archive) as z:
        z.extractall(target)
    return target
