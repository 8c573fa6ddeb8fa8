"""Popular items to answer with when serving fails.

A recommendation that arrives is worth more than a perfect one that does not: on
an upstream timeout, 5xx or connection failure the gateway answers with popular
items (marked `"fallback": true`) instead of an error.

The list comes from a JSON file when one is given (`--fallback-items`: a list of
item ids, best first, or `{"item_ids": [...], "scores": [...]}`), and is otherwise
learned from what the models served: every item in a successful response counts
once. The learned counts are bounded (the least served items are pruned), so a
gateway running for months holds a few thousand counters, not every item ever seen.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path

# Learned counters kept after pruning; pruning starts at twice this many.
LEARNED_ITEMS_KEPT = 5_000
# The learned ranking is re-sorted at most this often (fallbacks come in bursts).
RANKING_MAX_AGE_S = 1.0


class FallbackFileError(ValueError):
    pass


class PopularityFallback:
    def __init__(self, item_ids: Sequence[str] = (), scores: Sequence[float] | None = None) -> None:
        """A fixed list (best first) when `item_ids` is given, else a learning one."""
        if scores is not None and len(scores) != len(item_ids):
            raise FallbackFileError(f"{len(item_ids)} item ids but {len(scores)} scores")
        self._fixed = bool(item_ids)
        self._ranking: list[tuple[str, float]] = _ranked(item_ids, scores)
        self._ranked_at = time.monotonic()
        self._counts: Counter[str] = Counter()

    @classmethod
    def from_file(cls, path: Path) -> PopularityFallback:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise FallbackFileError(f"cannot read fallback items from {path}: {exc}") from None
        if isinstance(data, dict):
            item_ids, scores = data.get("item_ids"), data.get("scores")
        else:
            item_ids, scores = data, None
        if not isinstance(item_ids, list) or not all(isinstance(i, str) and i for i in item_ids):
            raise FallbackFileError(
                f"{path}: expected a list of item ids or {{'item_ids': [...], 'scores': [...]}}"
            )
        if scores is not None and not (
            isinstance(scores, list) and all(isinstance(s, int | float) for s in scores)
        ):
            raise FallbackFileError(f"{path}: scores must be a list of numbers")
        return cls(item_ids, scores)

    @property
    def known(self) -> bool:
        """Whether there is anything to answer with yet."""
        return bool(self._ranking) or bool(self._counts)

    def learn(self, served_item_ids: Sequence[str]) -> None:
        """Count items a model served (a no-op for a fixed list)."""
        if self._fixed:
            return
        self._counts.update(served_item_ids)
        if len(self._counts) > 2 * LEARNED_ITEMS_KEPT:
            self._counts = Counter(dict(self._counts.most_common(LEARNED_ITEMS_KEPT)))

    def top(self, k: int, exclude: Collection[str] = ()) -> tuple[list[str], list[float]]:
        """The `k` most popular items not in `exclude`, with their scores."""
        excluded = set(exclude)
        item_ids: list[str] = []
        scores: list[float] = []
        for item_id, score in self._current_ranking():
            if item_id in excluded:
                continue
            item_ids.append(item_id)
            scores.append(score)
            if len(item_ids) == k:
                break
        return item_ids, scores

    def _current_ranking(self) -> list[tuple[str, float]]:
        stale = time.monotonic() - self._ranked_at > RANKING_MAX_AGE_S
        if not self._fixed and self._counts and (stale or not self._ranking):
            top = self._counts.most_common(LEARNED_ITEMS_KEPT)
            most = top[0][1]
            self._ranking = [(item_id, count / most) for item_id, count in top]
            self._ranked_at = time.monotonic()
        return self._ranking


def _ranked(item_ids: Sequence[str], scores: Sequence[float] | None) -> list[tuple[str, float]]:
    """Pairs best first; without scores, linearly decreasing ones in (0, 1]."""
    if scores is None:
        n = len(item_ids)
        scores = [(n - rank) / n for rank in range(n)]
    return list(zip(item_ids, (float(s) for s in scores), strict=True))
