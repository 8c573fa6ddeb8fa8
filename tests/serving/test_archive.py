"""The versioned model archive (.mar): contents, manifest, and refusals."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from model_handlers.archive import ArchiveError, ArchiveRequest, BuiltArchive, build_archive
from recsys_contracts import archive_layout
from recsys_operator.api.recommender_system import IndexSpec

from .conftest import MODEL_NAME, TOP_K


def test_the_archive_holds_the_handler_model_index_and_manifest(
    archives: dict[str, BuiltArchive], model_dirs: dict[str, Path]
) -> None:
    built = archives["2"]
    assert built.path.name == archive_layout.mar_file_name(MODEL_NAME, "2") == "retrieval-2.mar"
    with zipfile.ZipFile(built.path) as z:
        names = set(z.namelist())
        mar = json.loads(z.read("MAR-INF/MANIFEST.json"))
        manifest = json.loads(z.read("manifest.json"))
        metrics = json.loads(z.read("metrics.json"))
        handler = z.read(archive_layout.HANDLER_FILE).decode()
    assert (
        set(archive_layout.ARCHIVE_FILES) | {archive_layout.HANDLER_FILE, "MAR-INF/MANIFEST.json"}
        <= names
    )
    assert mar["model"]["modelName"] == MODEL_NAME and mar["model"]["modelVersion"] == "2"
    assert mar["model"]["handler"] == archive_layout.HANDLER_FILE
    assert "class RetrievalHandler" in handler
    assert manifest["model_name"] == MODEL_NAME and manifest["model_version"] == "2"
    assert (
        manifest["embedding_dim"] == 16
        and manifest["num_items"] == 2000
        and manifest["top_k"] == TOP_K
    )
    assert manifest["index"]["type"] == "HNSW" and manifest["index"]["hnsw"]["m"] == 16
    assert manifest["index"]["hnsw"]["efSearch"] == 64
    assert 0.8 <= manifest["index_report"]["recall_at_10"] <= 1.0
    assert manifest["index_report"]["query_source"] == "user_histories"
    assert manifest["index_report"]["queries"] >= 1000  # recall is measured on many queries
    assert (
        manifest["training_metrics"]
        == metrics
        == json.loads((model_dirs["2"] / "metrics.json").read_text())
    )
    assert {"torch", "faiss"} <= set(manifest["software"])
    assert archives["1"].manifest.index_report.recall_at_10 == 1.0  # Flat is exact


def test_an_existing_version_is_not_overwritten_without_force(
    archives: dict[str, BuiltArchive], model_dirs: dict[str, Path]
) -> None:
    request = ArchiveRequest(
        model_dirs["1"],
        archives["1"].path.parent,
        MODEL_NAME,
        "1",
        IndexSpec(type="Flat"),
        top_k=TOP_K,
    )
    with pytest.raises(ArchiveError, match="exists"):
        build_archive(request)


@pytest.mark.parametrize(
    ("index", "top_k", "message"),
    [
        ({"type": "IVF-PQ", "ivfpq": {"nlist": 16, "m": 5, "nprobe": 1}}, 10, "m 5 must divide"),
        ({"type": "HNSW", "hnsw": {"efSearch": 8}}, 10, "efSearch 8 is below topK 10"),
        ({"type": "Flat"}, 1001, "top_k"),
    ],
)
def test_parameters_are_checked_with_the_api_rules(
    model_dirs: dict[str, Path], tmp_path: Path, index: dict[str, object], top_k: int, message: str
) -> None:
    request = ArchiveRequest(
        model_dirs["1"], tmp_path, MODEL_NAME, "9", IndexSpec.model_validate(index), top_k=top_k
    )
    with pytest.raises(ArchiveError, match=message):
        build_archive(request)
    assert not list(tmp_path.iterdir())


def test_a_folder_without_a_trained_model_is_refused(tmp_path: Path) -> None:
    request = ArchiveRequest(tmp_path, tmp_path / "out", MODEL_NAME, "1", IndexSpec(type="Flat"))
    with pytest.raises(ArchiveError, match="run `recsys train` first"):
        build_archive(request)
