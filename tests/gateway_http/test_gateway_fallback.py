"""The popularity fallback: from a file, or learned from what the models served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.fallback import LEARNED_ITEMS_KEPT, FallbackFileError, PopularityFallback


def test_a_plain_list_is_best_first(tmp_path: Path) -> None:
    path = tmp_path / "popular.json"
    path.write_text(json.dumps(["a", "b", "c", "d"]))
    fallback = PopularityFallback.from_file(path)
    assert fallback.known
    items, scores = fallback.top(2, exclude={"a"})
    assert items == ["b", "c"]
    assert scores[0] > scores[1]
    fallback.learn(["z"] * 10)  # a fixed list does not learn
    assert fallback.top(1) == (["a"], [1.0])


def test_a_list_with_scores(tmp_path: Path) -> None:
    path = tmp_path / "popular.json"
    path.write_text(json.dumps({"item_ids": ["x", "y"], "scores": [0.9, 0.4]}))
    assert PopularityFallback.from_file(path).top(5) == (["x", "y"], [0.9, 0.4])


@pytest.mark.parametrize(
    "content",
    ["not json", '{"item_ids": "a"}', '[1, 2]', '{"item_ids": ["a"], "scores": ["high"]}',
     '{"item_ids": ["a", "b"], "scores": [1]}'],
)  # fmt: skip
def test_a_bad_file_is_refused_with_a_reason(tmp_path: Path, content: str) -> None:
    path = tmp_path / "popular.json"
    path.write_text(content)
    with pytest.raises(FallbackFileError):
        PopularityFallback.from_file(path)


def test_learning_ranks_by_how_often_items_were_served() -> None:
    fallback = PopularityFallback()
    assert not fallback.known
    assert fallback.top(3) == ([], [])
    for _ in range(5):
        fallback.learn(["hit", "often"])
    fallback.learn(["often", "rare"])
    items, scores = fallback.top(3)
    assert items == ["often", "hit", "rare"]
    assert scores == [1.0, pytest.approx(5 / 6), pytest.approx(1 / 6)]
    assert fallback.top(3, exclude={"often"})[0] == ["hit", "rare"]


def test_learning_is_bounded() -> None:
    fallback = PopularityFallback()
    for n in range(3 * LEARNED_ITEMS_KEPT):
        fallback.learn([f"item-{n}"])
    assert len(fallback._counts) <= 2 * LEARNED_ITEMS_KEPT
