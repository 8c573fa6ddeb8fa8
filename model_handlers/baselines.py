"""Baselines every trained model is measured against: popularity and item-kNN.

Both follow the `evaluation.Scorer` shape: (user indices, histories) -> scores over
the whole catalogue.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from model_handlers.interactions import Interactions


class PopularityBaseline:
    """Everyone gets the items with the most training interactions."""

    def __init__(self, train: Interactions) -> None:
        self.counts = train.item_counts().astype(np.float32)

    def __call__(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), len(self.counts)))


class ItemKnnBaseline:
    """Item-based k-nearest neighbours: cosine similarity of items over the users who
    touched them (binary), the `neighbours` most similar kept per item. A user's score
    for an item is the summed similarity of that item to the items in their history.

    Memory grows with the co-occurrence pairs of one chunk of items; catalogues up to a
    few tens of thousands of items are fine.
    """

    def __init__(self, train: Interactions, *, neighbours: int = 100, chunk: int = 1024) -> None:
        n_items = train.num_items
        pairs = np.unique(np.stack([train.user, train.item], axis=1).astype(np.int64), axis=0)
        users, items = pairs[:, 0], pairs[:, 1]
        norms = np.sqrt(np.bincount(items, minlength=n_items)).astype(np.float32)
        user_item = torch.sparse_coo_tensor(
            torch.as_tensor(np.stack([users, items])),
            torch.ones(len(users)),
            (train.num_users, n_items),
            check_invariants=False,
        ).coalesce()
        by_item = np.argsort(items, kind="stable")
        item_bounds = np.searchsorted(items[by_item], np.arange(n_items + 1))
        k = min(neighbours, max(n_items - 1, 1))
        self.neighbour_items = np.zeros((n_items, k), dtype=np.int64)
        self.neighbour_sims = np.zeros((n_items, k), dtype=np.float32)
        for lo in range(0, n_items, chunk):
            hi = min(lo + chunk, n_items)
            rows = by_item[item_bounds[lo] : item_bounds[hi]]
            item_user = torch.sparse_coo_tensor(
                torch.as_tensor(np.stack([items[rows] - lo, users[rows]])),
                torch.ones(len(rows)),
                (hi - lo, train.num_users),
                check_invariants=False,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse support is in beta"
                co = torch.sparse.mm(item_user, user_item).to_dense().numpy()
            sims = co / np.maximum(norms[lo:hi, None] * norms[None, :], 1e-12)
            sims[np.arange(hi - lo), np.arange(lo, hi)] = 0.0  # an item is not its own neighbour
            top = (
                np.argpartition(-sims, k - 1, axis=1)[:, :k]
                if k < n_items
                else np.tile(np.arange(n_items), (hi - lo, 1))
            )
            self.neighbour_items[lo:hi] = top
            self.neighbour_sims[lo:hi] = np.take_along_axis(sims, top, axis=1)
        self.num_items = n_items

    def __call__(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        scores = np.zeros((len(users), self.num_items), dtype=np.float32)
        for row, history in enumerate(histories):
            if len(history):
                np.add.at(
                    scores[row],
                    self.neighbour_items[history].ravel(),
                    self.neighbour_sims[history].ravel(),
                )
        return scores


class EaseBaseline:
    """EASE (Steck 2019): B = inv(XᵀX + λI), divided column-wise by −diag, diagonal zeroed;
    a user's scores are their binary history row times B."""

    def __init__(self, train: Interactions, *, l2: float = 200.0) -> None:
        x = _binary_matrix(train)
        gram = (x.T @ x).astype(np.float64)
        gram[np.diag_indices_from(gram)] += l2
        p = np.linalg.inv(gram)
        self.b = (p / -np.diag(p)).astype(np.float32)
        np.fill_diagonal(self.b, 0.0)

    def __call__(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        x = np.zeros((len(users), len(self.b)), dtype=np.float32)
        for row, history in enumerate(histories):
            x[row, history] = 1.0
        return x @ self.b


class AlsBaseline:
    """Implicit-feedback ALS from the `implicit` package (a peer in benchmarks only)."""

    def __init__(
        self,
        train: Interactions,
        *,
        factors: int = 64,
        regularization: float = 0.05,
        iterations: int = 10,
        seed: int = 0,
    ) -> None:
        from implicit.als import AlternatingLeastSquares
        from scipy.sparse import csr_matrix

        pairs = np.unique(np.stack([train.user, train.item], axis=1).astype(np.int64), axis=0)
        matrix = csr_matrix(
            (np.ones(len(pairs), dtype=np.float32), (pairs[:, 0], pairs[:, 1])),
            shape=(train.num_users, train.num_items),
        )
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            iterations=iterations,
            random_state=seed,
            use_gpu=False,
        )
        try:  # implicit asks for a single-threaded BLAS under its own threads
            from threadpoolctl import threadpool_limits

            with threadpool_limits(1, "blas"):
                model.fit(matrix, show_progress=False)
        except ImportError:
            model.fit(matrix, show_progress=False)
        self.user_factors = np.asarray(model.user_factors)
        self.item_factors = np.asarray(model.item_factors)

    def __call__(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        return self.user_factors[users] @ self.item_factors.T


def _binary_matrix(train: Interactions) -> np.ndarray:
    x = np.zeros((train.num_users, train.num_items), dtype=np.float32)
    x[train.user, train.item] = 1.0
    return x
