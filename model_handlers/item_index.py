"""The FAISS item index: built from the API's `IndexSpec`, searched by inner product,
and measured against exact search.

| type | FAISS index | search-time parameter |
|---|---|---|
| Flat | `IndexFlatIP` (exact) | none |
| HNSW | `IndexHNSWFlat` (M, efConstruction) | efSearch, raised to k when k is larger |
| IVF-PQ | `IndexIVFPQ` over an `IndexFlatIP` coarse quantizer (nlist, m, nbits) | nprobe |
| IVF-PQ, refineFactor > 1 | `IndexRefineFlat` around that `IndexIVFPQ` | nprobe, refineFactor |
| SQ8 | `IndexScalarQuantizer` with 8-bit codes | none |

On a machine with CUDA and faiss-gpu, `ItemIndex.load(..., use_gpu=None)` moves Flat,
IVF-PQ and SQ8 indexes to the GPU; HNSW has no GPU version in FAISS and stays on the
CPU. Any failure to move falls back to the CPU index, which returns the same items.

With `refineFactor` r > 1 an IVF-PQ search fetches r x k candidates by their PQ codes and
re-ranks them by the exact inner product with the full vectors the refine index keeps:
the PQ codes choose the neighbourhood, exact scores choose the order. That index stays
on the CPU too (FAISS has no GPU IndexRefine; the re-ranking is a few hundred dot
products per query).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from recsys_contracts.index_spec import IndexSpec, IndexType

log = logging.getLogger(__name__)

GPU_MAX_K = 2048
"""FAISS GPU indexes return at most this many neighbours per query."""

ProgressCallback = Callable[[int, int], None]
"""(vectors added so far, total)."""


class IndexBuildError(ValueError):
    """The index parameters do not fit the vectors (e.g. more lists than items)."""


def build_index(
    vectors: np.ndarray,
    spec: IndexSpec,
    *,
    seed: int = 0,
    on_progress: ProgressCallback | None = None,
) -> faiss.Index:
    """A trained, filled CPU index of `vectors` (float32, one row per item id)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if n == 0:
        raise IndexBuildError("no vectors to index")
    index: faiss.Index
    if spec.type is IndexType.FLAT:
        index = faiss.IndexFlatIP(d)
    elif spec.type is IndexType.HNSW:
        index = faiss.IndexHNSWFlat(d, spec.hnsw.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.hnsw.ef_construction
        index.hnsw.efSearch = spec.hnsw.ef_search
    elif spec.type is IndexType.IVF_PQ:
        p = spec.ivfpq
        if d % p.m:
            raise IndexBuildError(f"IVF-PQ: m={p.m} must divide the dimension {d}")
        if p.nlist > n:
            raise IndexBuildError(f"IVF-PQ: nlist={p.nlist} exceeds the number of items {n}")
        if n < 2**p.nbits:
            raise IndexBuildError(
                f"IVF-PQ: nbits={p.nbits} needs at least {2**p.nbits} items to train, got {n}"
            )
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFPQ(quantizer, d, p.nlist, p.m, p.nbits, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = p.nprobe
        # FAISS wants ~39 points per centroid (coarse and PQ); more only slows training.
        sample = max(64 * p.nlist, 64 * 2**p.nbits)
        ivf.train(_training_sample(vectors, sample, seed))
        index = ivf
        if p.refine_factor > 1:
            # Wraps the empty trained index: adding through it fills both.
            index = faiss.IndexRefineFlat(ivf)
            index.k_factor = p.refine_factor
    elif spec.type is IndexType.SQ8:
        index = faiss.IndexScalarQuantizer(
            d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        index.train(_training_sample(vectors, 100_000, seed))
    else:  # pragma: no cover - IndexType is closed
        raise IndexBuildError(f"unknown index type {spec.type}")

    chunk = 50_000
    for lo in range(0, n, chunk):
        index.add(vectors[lo : lo + chunk])
        if on_progress:
            on_progress(min(lo + chunk, n), n)
    return index


def _training_sample(vectors: np.ndarray, size: int, seed: int) -> np.ndarray:
    if len(vectors) <= size:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
    return vectors[rows]


class ItemIndex:
    """A FAISS index plus the spec it was built with: searches with the right parameters
    on whichever device it lives."""

    def __init__(self, index: faiss.Index, spec: IndexSpec, *, device: str = "cpu") -> None:
        self.index = index
        self.spec = spec
        self.device = device
        self._gpu_resources: Any = None

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def refined(self) -> bool:
        """Whether searches re-rank a refine set exactly (IVF-PQ with refineFactor > 1)."""
        return self.spec.type is IndexType.IVF_PQ and self.spec.ivfpq.refine_factor > 1

    @classmethod
    def load(
        cls, path: Path, spec: IndexSpec, *, use_gpu: bool | None = None, gpu_device: int = 0
    ) -> ItemIndex:
        """Read an index; `use_gpu` None means "the GPU when FAISS sees one"."""
        item_index = cls(faiss.read_index(str(path)), spec)
        if use_gpu is None:
            use_gpu = gpu_count() > 0
        if use_gpu:
            item_index.move_to_gpu(gpu_device)
        return item_index

    def save(self, path: Path) -> None:
        index = self.index
        if self.device != "cpu":
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(path))

    def move_to_gpu(self, device: int = 0) -> bool:
        """Move to GPU `device`; False (and still on the CPU) when that is not possible."""
        if gpu_count() == 0:
            log.warning("no GPU visible to FAISS; the index stays on the CPU")
            return False
        if self.spec.type is IndexType.HNSW:
            log.warning("FAISS has no GPU HNSW; the index stays on the CPU")
            return False
        if self.refined:
            log.warning("FAISS has no GPU IndexRefine; the refined IVF-PQ index stays on the CPU")
            return False
        try:
            resources = faiss.StandardGpuResources()
            gpu_index = faiss.index_cpu_to_gpu(resources, device, self.index)
            if self.spec.type is IndexType.IVF_PQ:
                faiss.GpuParameterSpace().set_index_parameter(
                    gpu_index, "nprobe", self.spec.ivfpq.nprobe
                )
        except (RuntimeError, AttributeError) as exc:
            log.warning(
                "could not move the %s index to GPU %d (%s); using the CPU",
                self.spec.type,
                device,
                exc,
            )
            return False
        self.index, self._gpu_resources, self.device = gpu_index, resources, f"cuda:{device}"
        return True

    def search(
        self, queries: np.ndarray, k: int, *, widen: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the best `k` items per query, best first. Id -1 pads a row for
        which the index found fewer (IVF-PQ probing too few lists): search again with a
        larger `widen`, which multiplies nprobe (IVF-PQ) or efSearch (HNSW)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.size))
        if self.device != "cpu":
            k = min(k, GPU_MAX_K)
            if self.spec.type is IndexType.IVF_PQ and widen > 1:
                faiss.GpuParameterSpace().set_index_parameter(
                    self.index, "nprobe", self._nprobe(widen)
                )
            scores, ids = self.index.search(queries, k)
            if self.spec.type is IndexType.IVF_PQ and widen > 1:
                faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", self._nprobe(1))
        elif self.spec.type is IndexType.HNSW:
            ef = max(self.spec.hnsw.ef_search * widen, k)
            params = faiss.SearchParametersHNSW(efSearch=ef)  # type: ignore[attr-defined]
            scores, ids = self.index.search(queries, k, params=params)
        elif self.spec.type is IndexType.IVF_PQ:
            params = faiss.SearchParametersIVF(nprobe=self._nprobe(widen))  # type: ignore[call-arg]
            if self.refined:
                params = faiss.IndexRefineSearchParameters(  # type: ignore[call-arg]
                    k_factor=self.spec.ivfpq.refine_factor, base_index_params=params
                )
            scores, ids = self.index.search(queries, k, params=params)
        else:
            scores, ids = self.index.search(queries, k)
        return scores, ids

    def exhaustive(self, k: int, widen: int) -> bool:
        """Whether `search(..., k, widen=widen)` already looks at every item."""
        if k < self.size:
            return False
        return (
            self.spec.type is not IndexType.IVF_PQ or self._nprobe(widen) >= self.spec.ivfpq.nlist
        )

    def _nprobe(self, widen: int) -> int:
        return min(self.spec.ivfpq.nlist, self.spec.ivfpq.nprobe * widen)


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None and hasattr(faiss, "StandardGpuResources") else 0


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top `k` by inner product (brute force)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    _, ids = flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids


def recall_against(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> float:
    """Mean share of each query's exact top `k` that the approximate top `k` contains."""
    found = [
        len(np.intersect1d(a[:k], e[:k])) / k for a, e in zip(approx_ids, exact_ids, strict=True)
    ]
    return float(np.mean(found))


def perturbed_item_queries(
    vectors: np.ndarray, count: int, *, noise: float = 0.3, seed: int = 0
) -> np.ndarray:
    """Queries near random items (unit norm): held-out stand-ins when no user queries exist."""
    rng = np.random.default_rng(seed)
    base = vectors[rng.choice(len(vectors), size=min(count, len(vectors)), replace=False)]
    d = vectors.shape[1]
    queries = base + noise * rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(d)
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def measure_recall(
    index: ItemIndex, vectors: np.ndarray, queries: np.ndarray, k: int = 10
) -> float:
    """Recall@k of `index` against exact search over `vectors` on `queries`."""
    _, approx = index.search(queries, k)
    return recall_against(approx, exact_top_k(vectors, queries, k), k)


def serialized_size(index: faiss.Index) -> int:
    """Bytes the index takes when written."""
    return int(faiss.serialize_index(index).size)
