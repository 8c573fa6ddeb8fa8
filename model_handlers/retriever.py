"""The retrieval logic of the handler, independent of any model server.

For each request of a batch, the query vector comes from the best source available:

1. the **user tower**, given the user's id when it is known and their recent items
   (fresh from the feature store, else from the request), blended with the vectors of
   those recent items and re-ranked with a popularity prior (the session stage,
   `model_handlers.session_rerank`) when there are recent items;
2. the user's **online embedding** from the feature store (kept fresh by the stream
   job), when the tower has neither an id nor recent items it knows;
3. none: the user is unknown and has no recent items, so the answer is the most
   **popular** items (cold start).

The tower comes first because it was measured to be better: the online embedding (a
decayed sum of the few items a user touched, starting from zero) in first place cost
42% of the clicks, since it recommends the obscure neighbours of one or two items
(benchmarks/end_to_end.py). The session stage uses the same fresh items, but added to
the tower's query and ranked with popularity; see benchmarks/README.md for what each
step is worth on simulated users with drifting interests.

All query vectors of a batch go through the tower in one call and through the index in
one search. Items the user has just seen (their recent items) and items the request
excludes are filtered out; the search fetches enough extra candidates to still return
k items, and searches again for a row that comes up short.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model_handlers.item_index import ItemIndex
from model_handlers.model_directory import (
    Popularity,
    read_item_embeddings,
    read_item_ids,
    read_manifest,
    read_popularity,
    read_user_ids,
)
from model_handlers.online_features import NO_FEATURES, OnlineFeatures
from model_handlers.session_rerank import SESSION_OFF, SessionStage, rerank, session_vector
from model_handlers.two_tower import history_rows, load_user_tower, quantize_user_tower
from recsys_contracts import archive_layout as files
from recsys_contracts.retrieval_request import RetrievalRequest


class Source(StrEnum):
    ONLINE_EMBEDDING = "online_embedding"
    USER_TOWER = "user_tower"
    POPULARITY = "popularity"


@dataclass(frozen=True)
class Recommendation:
    item_ids: list[str]
    scores: list[float]
    model_version: str
    source: Source

    def response(self) -> dict[str, Any]:
        """The response body of the handler contract."""
        return {
            "item_ids": self.item_ids,
            "scores": self.scores,
            "model_version": self.model_version,
        }


@dataclass(frozen=True)
class RetrievalBatch:
    recommendations: list[Recommendation]
    tower_ms: float
    search_ms: float


@dataclass
class _Plan:
    """How one request is answered."""

    source: Source
    blocked: set[int]
    user_row: int = 0
    history: tuple[int, ...] = ()
    embedding: np.ndarray | None = None
    session: tuple[int, ...] = ()
    """Recent item positions (newest first) for the session stage; empty: no stage."""


class Retriever:
    def __init__(
        self,
        *,
        model_name: str,
        model_version: str,
        user_tower: nn.Module,
        history_length: int,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        index: ItemIndex,
        popularity: Popularity,
        max_k: int,
        item_vectors: np.ndarray | None = None,
        session: SessionStage = SESSION_OFF,
    ) -> None:
        if index.size != len(item_ids):
            raise ValueError(
                f"the index holds {index.size} items but item_ids lists {len(item_ids)}"
            )
        self.model_name = model_name
        self.model_version = model_version
        self.user_tower = user_tower
        self.history_length = history_length
        self.user_row = {u: n + 1 for n, u in enumerate(user_ids)}
        self.item_ids = list(item_ids)
        self.item_position = {i: n for n, i in enumerate(item_ids)}
        self.index = index
        self.max_k = max_k
        positions = [self.item_position.get(i) for i in popularity.item_ids]
        top = max(popularity.counts[0], 1) if popularity.counts else 1
        self.popular = [
            (p, c / top) for p, c in zip(positions, popularity.counts, strict=True) if p is not None
        ]
        if session.enabled and (item_vectors is None or len(item_vectors) != len(item_ids)):
            raise ValueError("the session stage needs one item vector per item id")
        self.session = session
        self.item_vectors = item_vectors
        # log(1 + training interactions) per item position; items past the archive's
        # popularity list count as never seen.
        self.log_popularity = np.zeros(len(self.item_ids), dtype=np.float32)
        for p, c in zip(positions, popularity.counts, strict=True):
            if p is not None:
                self.log_popularity[p] = np.log1p(c)

    @classmethod
    def load(
        cls,
        directory: Path,
        *,
        use_gpu: bool | None = None,
        gpu_device: int = 0,
        quantize_tower: bool = False,
        max_k: int | None = None,
        session: SessionStage | None = None,
    ) -> Retriever:
        """A retriever from an unpacked archive (a model directory with index and manifest);
        `session` None: the session stage with its default settings for a two-tower
        model, none for another kind (EASE's scores are its own ranking; the stage was
        measured on the two-tower model only)."""
        manifest = read_manifest(directory)
        tower: nn.Module = load_user_tower(directory)
        if session is None:
            session = default_session_stage(tower)
        if quantize_tower:
            tower = quantize_user_tower(tower)
        index = ItemIndex.load(
            directory / files.ITEM_INDEX, manifest.index, use_gpu=use_gpu, gpu_device=gpu_device
        )
        return cls(
            model_name=manifest.model_name,
            model_version=manifest.model_version,
            user_tower=tower,
            history_length=manifest.history_length,
            user_ids=read_user_ids(directory),
            item_ids=read_item_ids(directory),
            index=index,
            popularity=read_popularity(directory),
            max_k=max_k or manifest.top_k,
            item_vectors=read_item_embeddings(directory, mmap=True) if session.enabled else None,
            session=session,
        )

    @property
    def dim(self) -> int:
        return self.index.dim

    def recommend(
        self,
        requests: Sequence[RetrievalRequest],
        online: Sequence[OnlineFeatures] | None = None,
    ) -> RetrievalBatch:
        """Top-k items for each request; `online[n]` are request n's store features."""
        online = online if online is not None else [NO_FEATURES] * len(requests)
        plans = [self._plan(r, f) for r, f in zip(requests, online, strict=True)]
        queries = np.zeros((len(requests), self.dim), dtype=np.float32)

        started = time.perf_counter()
        tower_rows = [n for n, p in enumerate(plans) if p.source is Source.USER_TOWER]
        if tower_rows:
            queries[tower_rows] = self.embed([plans[n] for n in tower_rows])
        for n, plan in enumerate(plans):
            if plan.embedding is not None:
                queries[n] = plan.embedding
            if plan.session:
                assert self.item_vectors is not None
                queries[n] += self.session.weight * session_vector(
                    self.item_vectors, plan.session, self.session
                )
        tower_ms = (time.perf_counter() - started) * 1000

        started = time.perf_counter()
        searched = [n for n, p in enumerate(plans) if p.source is not Source.POPULARITY]
        results: dict[int, tuple[list[int], list[float]]] = {}
        if searched:
            results = self._search(
                queries[searched],
                [
                    max(requests[n].k, self.session.candidates)
                    if plans[n].session
                    else requests[n].k
                    for n in searched
                ],
                [plans[n].blocked for n in searched],
            )
            results = {searched[row]: hits for row, hits in results.items()}
        search_ms = (time.perf_counter() - started) * 1000

        recommendations = []
        for n, (request, plan) in enumerate(zip(requests, plans, strict=True)):
            if plan.source is Source.POPULARITY:
                positions, scores = self._popular(request.k, plan.blocked)
            else:
                positions, scores = results[n]
                if plan.session:
                    positions, scores = rerank(
                        positions, scores, self.log_popularity, self.session, request.k
                    )
            recommendations.append(
                Recommendation(
                    item_ids=[self.item_ids[p] for p in positions],
                    scores=[round(float(s), 6) for s in scores],
                    model_version=self.model_version,
                    source=plan.source,
                )
            )
        return RetrievalBatch(recommendations, tower_ms=tower_ms, search_ms=search_ms)

    # --- the steps --------------------------------------------------------------------

    def _plan(self, request: RetrievalRequest, features: OnlineFeatures) -> _Plan:
        seen = (
            *request.exclude_item_ids,
            *request.recent_item_ids,
            *features.recent_item_ids,
            *features.seen_item_ids,  # a heavy user's whole history, beyond the last N
        )
        blocked = {p for p in map(self.item_position.get, seen) if p is not None}
        recent = features.recent_item_ids or request.recent_item_ids  # newest first
        history = tuple(p for p in map(self.item_position.get, recent) if p is not None)[
            : self.history_length
        ]
        user_row = self.user_row.get(request.user_id, 0) if request.user_id is not None else 0
        if user_row or history:
            session = history if self.session.enabled else ()
            return _Plan(
                Source.USER_TOWER, blocked, user_row=user_row, history=history, session=session
            )
        if features.embedding is not None and len(features.embedding) == self.dim:
            norm = float(np.linalg.norm(features.embedding))
            if norm > 0:
                return _Plan(Source.ONLINE_EMBEDDING, blocked, embedding=features.embedding / norm)
        return _Plan(Source.POPULARITY, blocked)

    @torch.inference_mode()
    def embed(self, plans: Sequence[_Plan]) -> np.ndarray:
        users = torch.as_tensor([p.user_row for p in plans], dtype=torch.long)
        # history_rows wants oldest first and keeps the newest `history_length`.
        histories = [np.asarray(p.history[::-1], dtype=np.int64) for p in plans]
        history = torch.as_tensor(history_rows(histories, self.history_length))
        out: torch.Tensor = self.user_tower(users, history)
        return out.numpy()

    def _search(
        self, queries: np.ndarray, ks: list[int], blocked: list[set[int]]
    ) -> dict[int, tuple[list[int], list[float]]]:
        fetch = min(self.index.size, max(k + len(b) for k, b in zip(ks, blocked, strict=True)))
        scores, ids = self.index.search(queries, fetch)
        results = {}
        for row in range(len(queries)):
            hits = _keep(ids[row], scores[row], blocked[row], ks[row])
            row_fetch, widen = fetch, 1
            # Short (IVF-PQ probed too few lists, or HNSW missed): widen the search until
            # the row is full or the whole catalogue has been looked at.
            while len(hits[0]) < ks[row] and not self.index.exhaustive(row_fetch, widen):
                row_fetch, widen = min(self.index.size, 2 * row_fetch), 2 * widen
                more_scores, more_ids = self.index.search(
                    queries[row : row + 1], row_fetch, widen=widen
                )
                hits = _keep(more_ids[0], more_scores[0], blocked[row], ks[row])
            results[row] = hits
        return results

    def _popular(self, k: int, blocked: set[int]) -> tuple[list[int], list[float]]:
        positions, scores = [], []
        for position, score in self.popular:
            if position not in blocked:
                positions.append(position)
                scores.append(score)
                if len(positions) == k:
                    break
        return positions, scores


def default_session_stage(tower: nn.Module) -> SessionStage:
    """On with its defaults for a two-tower model; off for another kind (EASE's scores
    are its own ranking, and the stage was measured on the two-tower model only)."""
    config = getattr(tower, "config", None)
    return SessionStage() if getattr(config, "kind", None) == "two_tower" else SESSION_OFF


def _keep(
    ids: np.ndarray, scores: np.ndarray, blocked: set[int], k: int
) -> tuple[list[int], list[float]]:
    positions, kept = [], []
    for position, score in zip(ids.tolist(), scores.tolist(), strict=True):
        if position >= 0 and position not in blocked:
            positions.append(position)
            kept.append(score)
            if len(positions) == k:
                break
    return positions, kept
