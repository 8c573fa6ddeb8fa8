"""FAISS indexes from the API's IndexSpec: recall against exact search, parameters,
errors, files, and the CPU fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_handlers.item_index import (
    IndexBuildError,
    ItemIndex,
    build_index,
    exact_top_k,
    gpu_count,
    measure_recall,
    perturbed_item_queries,
    recall_against,
)
from recsys_operator.api.recommender_system import IndexSpec


@pytest.fixture(scope="module")
def clustered() -> np.ndarray:
    """Unit vectors around 50 centres in 16 dimensions: structure like real embeddings."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 16))
    x = centres[rng.integers(0, 50, 6000)] + 0.3 * rng.standard_normal((6000, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def spec(wire: dict[str, object]) -> IndexSpec:
    return IndexSpec.model_validate(wire)


@pytest.mark.parametrize(
    ("wire", "floor"),
    [
        ({"type": "Flat"}, 1.0),
        ({"type": "HNSW", "hnsw": {"m": 16, "efConstruction": 40, "efSearch": 64}}, 0.95),
        ({"type": "SQ8"}, 0.85),
        ({"type": "IVF-PQ", "ivfpq": {"nlist": 64, "m": 8, "nbits": 8, "nprobe": 16}}, 0.5),
    ],
)
def test_each_index_type_finds_the_exact_top_10(
    clustered: np.ndarray, wire: dict[str, object], floor: float
) -> None:
    queries = perturbed_item_queries(clustered, 300, seed=1)
    index = ItemIndex(build_index(clustered, spec(wire)), spec(wire))
    assert index.size == len(clustered) and index.dim == 16
    recall = measure_recall(index, clustered, queries)
    assert recall >= floor
    _, approx = index.search(queries, 10)
    assert recall == pytest.approx(recall_against(approx, exact_top_k(clustered, queries, 10)))


def test_search_parameters_come_from_the_spec(clustered: np.ndarray) -> None:
    queries = perturbed_item_queries(clustered, 200, seed=2)
    low = spec({"type": "IVF-PQ", "ivfpq": {"nlist": 64, "m": 8, "nbits": 8, "nprobe": 1}})
    high = spec({"type": "IVF-PQ", "ivfpq": {"nlist": 64, "m": 8, "nbits": 8, "nprobe": 64}})
    built = build_index(clustered, low)
    assert measure_recall(ItemIndex(built, high), clustered, queries) > measure_recall(
        ItemIndex(built, low), clustered, queries
    )


def test_hnsw_returns_k_results_beyond_ef_search(clustered: np.ndarray) -> None:
    small_ef = spec({"type": "HNSW", "hnsw": {"m": 8, "efSearch": 10}})
    index = ItemIndex(build_index(clustered, small_ef), small_ef)
    _, ids = index.search(clustered[:5], 200)
    assert ids.shape == (5, 200) and (ids >= 0).all()
    assert all(len(set(row)) == 200 for row in ids.tolist())


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (
            {"type": "IVF-PQ", "ivfpq": {"nlist": 10_000, "m": 8, "nprobe": 1}},
            "nlist=10000 exceeds",
        ),
        ({"type": "IVF-PQ", "ivfpq": {"nlist": 16, "m": 5, "nprobe": 1}}, "m=5 must divide"),
        (
            {"type": "IVF-PQ", "ivfpq": {"nlist": 16, "m": 8, "nbits": 12, "nprobe": 1}},
            "needs at least 4096",
        ),
    ],
)
def test_parameters_that_do_not_fit_the_data_are_refused(
    clustered: np.ndarray, wire: dict[str, object], message: str
) -> None:
    with pytest.raises(IndexBuildError, match=message):
        build_index(clustered[:3000], spec(wire))


def test_an_index_file_loads_back_on_the_cpu_without_a_gpu(
    clustered: np.ndarray, tmp_path: Path
) -> None:
    hnsw = spec({"type": "HNSW", "hnsw": {"m": 16}})
    index = ItemIndex(build_index(clustered, hnsw), hnsw)
    index.save(tmp_path / "items.faiss")
    assert gpu_count() == 0  # this machine has faiss-cpu: "auto" must fall back
    loaded = ItemIndex.load(tmp_path / "items.faiss", hnsw, use_gpu=None)
    assert loaded.device == "cpu" and not loaded.move_to_gpu()
    np.testing.assert_array_equal(
        loaded.search(clustered[:20], 10)[1], index.search(clustered[:20], 10)[1]
    )


def test_refining_ivf_pq_reranks_its_candidates_exactly(clustered: np.ndarray) -> None:
    """The PQ codes alone miss neighbours; re-ranking a refine set of 8 x k by exact
    inner product recovers them, and the scores returned are the exact ones."""
    queries = perturbed_item_queries(clustered, 300, seed=3)
    ivfpq = {"nlist": 64, "m": 4, "nbits": 8, "nprobe": 16}
    plain = spec({"type": "IVF-PQ", "ivfpq": ivfpq})
    refined = spec({"type": "IVF-PQ", "ivfpq": {**ivfpq, "refineFactor": 8}})
    plain_index = ItemIndex(build_index(clustered, plain), plain)
    refined_index = ItemIndex(build_index(clustered, refined), refined)
    assert refined_index.refined and not plain_index.refined
    plain_recall = measure_recall(plain_index, clustered, queries)
    refined_recall = measure_recall(refined_index, clustered, queries)
    assert plain_recall < 0.9 and refined_recall >= 0.95, (plain_recall, refined_recall)
    scores, ids = refined_index.search(queries[:20], 10)
    exact = np.einsum("qd,qkd->qk", queries[:20], clustered[ids])
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5)


def test_a_refined_index_keeps_its_refine_set_through_save_and_load(
    clustered: np.ndarray, tmp_path: Path
) -> None:
    refined = spec(
        {"type": "IVF-PQ", "ivfpq": {"nlist": 32, "m": 4, "nprobe": 8, "refineFactor": 4}}
    )
    index = ItemIndex(build_index(clustered, refined), refined)
    index.save(tmp_path / "items.faiss")
    loaded = ItemIndex.load(tmp_path / "items.faiss", refined, use_gpu=None)
    assert loaded.device == "cpu" and not loaded.move_to_gpu()
    np.testing.assert_array_equal(
        loaded.search(clustered[:20], 10)[1], index.search(clustered[:20], 10)[1]
    )
