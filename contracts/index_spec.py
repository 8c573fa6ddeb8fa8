"""The FAISS index's parameters: part of the RecommenderSystem API (`spec.model.index`)
and of every archive's manifest, so the operator and the model handlers share one model."""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import Field, model_validator

from recsys_contracts.api_base import ApiModel, field_error


class IndexType(StrEnum):
    FLAT = "Flat"
    HNSW = "HNSW"
    IVF_PQ = "IVF-PQ"
    SQ8 = "SQ8"


class HnswParams(ApiModel):
    """Parameters of an HNSW graph index."""

    m: int = Field(default=32, ge=4, le=128)
    """Neighbours per node: more means better recall, more memory and slower builds."""
    ef_construction: int = Field(default=40, ge=8, le=1024)
    """Candidate list size while building."""
    ef_search: int = Field(default=64, ge=1, le=4096)
    """Candidate list size while searching; must be at least the model's topK."""


class IvfPqParams(ApiModel):
    """Parameters of an IVF index with product quantization."""

    nlist: int = Field(default=1024, ge=1, le=1_048_576)
    """Number of inverted lists (coarse clusters)."""
    m: int = Field(default=8, ge=1, le=256)
    """Number of sub-quantizers; must divide embeddingDim."""
    nbits: int = Field(default=8, ge=4, le=12)
    """Bits per sub-quantizer code."""
    nprobe: int = Field(default=16, ge=1)
    """Lists visited per query; at most nlist."""
    refine_factor: int = Field(default=1, ge=1, le=256)
    """Re-rank `refineFactor` x k candidates by exact inner product before keeping the top k
    (FAISS IndexRefineFlat). 1 means no re-ranking; above 1 the index also keeps the full
    float32 vectors (4 x embeddingDim bytes per item beside the m-byte codes), and recall
    at the same nprobe rises from the PQ codes' to nearly exact (benchmarks/serving.py)."""


class IndexSpec(ApiModel):
    """The FAISS index used for retrieval (inner product)."""

    type: IndexType = IndexType.HNSW
    """Flat is exact; HNSW and IVF-PQ are approximate and much faster on large catalogues; SQ8 is exact-ish with 4x less memory."""
    hnsw: HnswParams = Field(default_factory=HnswParams)
    """Used when type is HNSW."""
    ivfpq: IvfPqParams = Field(default_factory=IvfPqParams)
    """Used when type is IVF-PQ."""

    @model_validator(mode="after")
    def _ivfpq_consistent(self) -> Self:
        if self.type is IndexType.IVF_PQ and self.ivfpq.nprobe > self.ivfpq.nlist:
            raise field_error(
                "ivfpq.nprobe", f"nprobe {self.ivfpq.nprobe} exceeds nlist {self.ivfpq.nlist}"
            )
        return self


def index_fit_problems(
    index: IndexSpec, *, embedding_dim: int, num_items: int | None, top_k: int
) -> list[tuple[str, str]]:
    """(field, message) for each way `index` cannot serve a model of this shape; fields are
    camelCase paths relative to the model (`index.hnsw.efSearch`). The API's ModelSpec and
    the archive builder both check with this."""
    problems = []
    if num_items is not None and top_k > num_items:
        problems.append(("topK", f"topK {top_k} exceeds the catalogue size numItems {num_items}"))
    if index.type is IndexType.IVF_PQ:
        if embedding_dim % index.ivfpq.m:
            problems.append(
                ("index.ivfpq.m", f"m {index.ivfpq.m} must divide embeddingDim {embedding_dim}")
            )
        if num_items is not None and index.ivfpq.nlist > num_items:
            problems.append(
                (
                    "index.ivfpq.nlist",
                    f"nlist {index.ivfpq.nlist} exceeds the catalogue size numItems {num_items}",
                )
            )
        refine_set = top_k * index.ivfpq.refine_factor
        if num_items is not None and index.ivfpq.refine_factor > 1 and refine_set > num_items:
            problems.append(
                (
                    "index.ivfpq.refineFactor",
                    f"topK x refineFactor = {refine_set} exceeds the catalogue size numItems "
                    f"{num_items}: the refine set would be the whole catalogue (use Flat)",
                )
            )
    if index.type is IndexType.HNSW and index.hnsw.ef_search < top_k:
        problems.append(
            (
                "index.hnsw.efSearch",
                f"efSearch {index.hnsw.ef_search} is below topK {top_k}; HNSW cannot return more than efSearch results",
            )
        )
    return problems
