"""Loading item embeddings and following model versions on disk."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from stream_support import write_item_embeddings

from stream_jobs.item_embeddings import (
    IDS_FILE,
    VECTORS_FILE,
    EmbeddingCatalog,
    EmbeddingsError,
    ItemEmbeddings,
)


def test_an_archive_directory_loads_with_rows_by_item_id(tmp_path: Path) -> None:
    vectors = write_item_embeddings(tmp_path, ["a", "b", "c"], dim=4, seed=0)
    items = ItemEmbeddings.from_path("v1", tmp_path)
    assert items.dim == 4 and items.item_ids == ("a", "b", "c")
    assert np.array_equal(items.vector("b"), vectors[1])
    assert items.vector("zzz") is None


def test_a_npy_file_and_an_id_list_load_from_anywhere(tmp_path: Path) -> None:
    np.save(tmp_path / "m.npy", np.ones((2, 3), dtype=np.float64))
    (tmp_path / "ids.json").write_text(json.dumps([10, 11]))  # numeric ids become strings
    items = ItemEmbeddings.from_files("v9", tmp_path / "m.npy", tmp_path / "ids.json")
    assert items.vectors.dtype == np.float32
    assert items.vector("11") is not None


@pytest.mark.parametrize(
    ("vectors", "ids", "message"),
    [
        (np.ones((2, 3)), ["a"], "1 item ids for 2 embedding rows"),
        (np.ones(3), ["a", "b", "c"], "must be 2-d"),
        (np.ones((1, 3)), {"a": 0}, "must be a JSON list"),
    ],
)
def test_inconsistent_files_are_refused_with_the_reason(
    tmp_path: Path, vectors: np.ndarray, ids: object, message: str
) -> None:
    np.save(tmp_path / VECTORS_FILE, vectors)
    (tmp_path / IDS_FILE).write_text(json.dumps(ids))
    with pytest.raises(EmbeddingsError, match=message):
        ItemEmbeddings.from_path("v1", tmp_path)


def test_missing_files_are_an_embeddings_error(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingsError, match="cannot"):
        ItemEmbeddings.from_path("v1", tmp_path)


def test_one_models_directory_needs_its_version_named(tmp_path: Path) -> None:
    write_item_embeddings(tmp_path, ["a"], dim=2, seed=0)
    with pytest.raises(EmbeddingsError, match="set model_version"):
        EmbeddingCatalog(tmp_path).refresh()
    catalog = EmbeddingCatalog(tmp_path, "v7")
    assert catalog.refresh()
    assert list(catalog.versions) == ["v7"]


def test_the_catalog_follows_versions_appearing_changing_and_disappearing(tmp_path: Path) -> None:
    catalog = EmbeddingCatalog(tmp_path)
    assert not catalog.refresh() and catalog.versions == {}
    write_item_embeddings(tmp_path / "v1", ["a", "b"], dim=2, seed=0)
    assert catalog.refresh()
    assert list(catalog.versions) == ["v1"]
    assert not catalog.refresh()  # nothing changed on disk: nothing reloaded
    write_item_embeddings(tmp_path / "v2", ["a"], dim=3, seed=1)
    assert catalog.refresh() and sorted(catalog.versions) == ["v1", "v2"]
    # v1 is rewritten (a new archive of the same version): reloaded
    rewritten = write_item_embeddings(tmp_path / "v1", ["a", "b", "c"], dim=2, seed=5)
    stamp = (tmp_path / "v1" / VECTORS_FILE).stat().st_mtime_ns + 10**9
    os.utime(tmp_path / "v1" / VECTORS_FILE, ns=(stamp, stamp))
    assert catalog.refresh()
    assert np.array_equal(catalog.versions["v1"].vector("c"), rewritten[2])
    for name in (VECTORS_FILE, IDS_FILE):
        (tmp_path / "v2" / name).unlink()
    assert catalog.refresh() and list(catalog.versions) == ["v1"]


def test_a_broken_rewrite_keeps_the_previous_embeddings(tmp_path: Path) -> None:
    write_item_embeddings(tmp_path / "v1", ["a"], dim=2, seed=0)
    catalog = EmbeddingCatalog(tmp_path)
    catalog.refresh()
    (tmp_path / "v1" / IDS_FILE).write_text("[not json")
    assert not catalog.refresh()
    assert catalog.versions["v1"].vector("a") is not None


def make_archive(path: Path, item_ids: list[str], dim: int, seed: int) -> np.ndarray:
    """A model archive as `recsys archive` packs it: a zip with the files at its top."""
    with tempfile.TemporaryDirectory() as staging:
        vectors = write_item_embeddings(Path(staging), item_ids, dim, seed)
        with zipfile.ZipFile(path, "w") as archive:
            for name in (VECTORS_FILE, IDS_FILE):
                archive.write(Path(staging) / name, name)
            archive.writestr("MAR-INF/MANIFEST.json", "{}")
    return vectors


def test_a_model_archive_loads_like_its_directory(tmp_path: Path) -> None:
    vectors = make_archive(tmp_path / "recs-v4.mar", ["a", "b"], dim=3, seed=4)
    items = ItemEmbeddings.from_path("v4", tmp_path / "recs-v4.mar")
    assert np.array_equal(items.vector("b"), vectors[1])
    (tmp_path / "empty.mar").write_bytes(b"not a zip")
    with pytest.raises(EmbeddingsError, match="cannot load embeddings from"):
        ItemEmbeddings.from_path("v4", tmp_path / "empty.mar")


def test_a_root_of_archives_and_directories_gives_one_version_each(tmp_path: Path) -> None:
    make_archive(tmp_path / "v1.mar", ["a"], dim=2, seed=1)
    write_item_embeddings(tmp_path / "v2", ["a", "b"], dim=2, seed=2)
    (tmp_path / "notes.txt").write_text("not a model")
    catalog = EmbeddingCatalog(tmp_path)
    assert catalog.refresh()
    assert {v: len(e.item_ids) for v, e in catalog.versions.items()} == {"v1": 1, "v2": 2}


def test_the_model_archive_uri_is_read_from_a_path_or_file_uri(tmp_path: Path) -> None:
    make_archive(tmp_path / "recs-v5.mar", ["a"], dim=2, seed=5)
    for uri in (str(tmp_path / "recs-v5.mar"), f"file://{tmp_path / 'recs-v5.mar'}"):
        catalog = EmbeddingCatalog(None, "v5", archive_uri=uri)
        assert catalog.refresh() and list(catalog.versions) == ["v5"]


def test_every_served_version_is_loaded_and_one_bad_uri_hides_no_other(tmp_path: Path) -> None:
    make_archive(tmp_path / "stable.mar", ["a"], dim=2, seed=1)
    make_archive(tmp_path / "canary.mar", ["a", "b"], dim=2, seed=2)
    catalog = EmbeddingCatalog(
        None,
        archive_uris={
            "1": str(tmp_path / "stable.mar"),
            "2": f"file://{tmp_path / 'canary.mar'}",
            "3": "s3://bucket/recs-3.mar",  # logged; the job keeps the other two fresh
        },
    )
    assert catalog.refresh()
    assert {v: len(e.item_ids) for v, e in catalog.versions.items()} == {"1": 1, "2": 2}


def test_an_http_model_archive_is_downloaded_once(tmp_path: Path) -> None:
    make_archive(tmp_path / "recs-v6.mar", ["a", "b", "c"], dim=2, seed=6)
    requests: list[str] = []

    class Files(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args: object) -> None:
            requests.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}/recs-v6.mar"
        catalog = EmbeddingCatalog(None, "v6", archive_uri=uri)
        assert catalog.refresh() and len(catalog.versions["v6"].item_ids) == 3
        assert not catalog.refresh()
        assert requests == ["/recs-v6.mar"]
        missing = EmbeddingCatalog(None, "v6", archive_uri=uri.replace("v6.mar", "v7.mar"))
        with pytest.raises(EmbeddingsError, match="cannot download"):
            missing.refresh()
    finally:
        server.shutdown()
        thread.join(5)


def test_uris_the_job_cannot_fetch_say_what_to_do_instead() -> None:
    with pytest.raises(EmbeddingsError, match="give its local path as embeddings_path"):
        EmbeddingCatalog(None, "v1", archive_uri="s3://bucket/recs-v1.mar").refresh()


def test_no_path_means_no_embeddings(tmp_path: Path) -> None:
    assert not EmbeddingCatalog(None).refresh()
    assert not EmbeddingCatalog(tmp_path / "absent").refresh()
