"""Item embeddings of the model versions being served, for the online user embedding.

A model carries `item_embeddings.npy` (float32, one row per item) and
`item_ids.json` (the item id of each row), in its model directory and in its
archive (`<name>-<version>.mar`, a zip; see recsys_contracts/archive_layout.py).
The job finds them in one of these places:

- `model_archives` (version -> URI), or `model_archive_uri` with `model_version`: the
  served versions' archives or directories, as a path, `file://` or `http(s)://` URI
  (each downloaded once); the operator names the stable and the canary version here;
- `embeddings_path`: one model's directory or archive (named by `model_version`),
  or a directory of them, one per model version (`<root>/<version>/` or
  `<root>/<version>.mar`), so that during a rollout both versions stay fresh.

`EmbeddingCatalog.refresh()` rescans and reloads only what changed on disk, so a
new model version is picked up without a restart.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from recsys_contracts.archive_layout import ITEM_EMBEDDINGS, ITEM_IDS

# The archive layout's names (recsys_contracts.archive_layout).
VECTORS_FILE = ITEM_EMBEDDINGS
IDS_FILE = ITEM_IDS
ARCHIVE_SUFFIXES = (".mar", ".zip")

log = logging.getLogger(__name__)


class EmbeddingsError(ValueError):
    """Embedding files that cannot be used (missing, malformed, or inconsistent)."""


@dataclass(frozen=True)
class ItemEmbeddings:
    """The item embeddings of one model version."""

    model_version: str
    item_ids: tuple[str, ...]
    vectors: np.ndarray
    rows: Mapping[str, int] = field(repr=False)

    @classmethod
    def from_arrays(
        cls, model_version: str, item_ids: list[str], vectors: np.ndarray
    ) -> ItemEmbeddings:
        matrix = np.ascontiguousarray(vectors, dtype=np.float32)
        if matrix.ndim != 2:
            raise EmbeddingsError(
                f"{model_version}: embeddings must be 2-d, got shape {matrix.shape}"
            )
        if len(item_ids) != matrix.shape[0]:
            raise EmbeddingsError(
                f"{model_version}: {len(item_ids)} item ids for {matrix.shape[0]} embedding rows"
            )
        rows = {str(item_id): i for i, item_id in enumerate(item_ids)}
        return cls(model_version, tuple(rows), matrix, rows)

    @classmethod
    def from_bytes(cls, model_version: str, vectors: bytes, ids: bytes) -> ItemEmbeddings:
        """From the contents of a `.npy` file and of a JSON list of item ids."""
        try:
            matrix = np.load(io.BytesIO(vectors), allow_pickle=False)
            item_ids = json.loads(ids)
        except ValueError as exc:
            raise EmbeddingsError(f"{model_version}: cannot read embeddings: {exc}") from exc
        if not isinstance(item_ids, list):
            raise EmbeddingsError(f"{model_version}: the item ids must be a JSON list")
        return cls.from_arrays(model_version, [str(i) for i in item_ids], matrix)

    @classmethod
    def from_files(cls, model_version: str, vectors_path: Path, ids_path: Path) -> ItemEmbeddings:
        """Load a `.npy` matrix and a JSON list of item ids (one per row)."""
        try:
            return cls.from_bytes(model_version, vectors_path.read_bytes(), ids_path.read_bytes())
        except OSError as exc:
            raise EmbeddingsError(f"{model_version}: cannot load embeddings: {exc}") from exc

    @classmethod
    def from_path(cls, model_version: str, path: Path) -> ItemEmbeddings:
        """Load from a model directory holding the two files, or from an archive of it."""
        if path.is_dir():
            return cls.from_files(model_version, path / VECTORS_FILE, path / IDS_FILE)
        try:
            with zipfile.ZipFile(path) as archive:
                return cls.from_bytes(
                    model_version, archive.read(VECTORS_FILE), archive.read(IDS_FILE)
                )
        except (OSError, KeyError, zipfile.BadZipFile) as exc:
            raise EmbeddingsError(
                f"{model_version}: cannot load embeddings from {path}: {exc}"
            ) from exc

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def vector(self, item_id: str) -> np.ndarray | None:
        """The embedding of `item_id`, or None when this model does not know the item."""
        row = self.rows.get(item_id)
        return None if row is None else self.vectors[row]


def holds_embeddings(path: Path) -> bool:
    """Whether `path` is a model directory with both files, or a model archive."""
    if path.is_dir():
        return (path / VECTORS_FILE).is_file() and (path / IDS_FILE).is_file()
    return path.is_file() and path.suffix in ARCHIVE_SUFFIXES


def _signature(path: Path) -> tuple[int, ...]:
    """What changes when the files are rewritten (mtime and size)."""
    files = [path / VECTORS_FILE, path / IDS_FILE] if path.is_dir() else [path]
    return tuple(n for f in files for n in (f.stat().st_mtime_ns, f.stat().st_size))


def download(uri: str, folder: Path) -> Path:
    """Fetch an http(s) archive into `folder`; the local path."""
    target = folder / (Path(urlparse(uri).path).name or "model.mar")
    with urllib.request.urlopen(uri, timeout=60) as response, open(target, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    return target


def local_copy(archive_uri: str) -> Path:
    """A local path for an archive URI: a path or file:// as is, http(s):// downloaded."""
    uri = urlparse(archive_uri)
    if uri.scheme in ("", "file"):
        return Path(uri.path)
    if uri.scheme in ("http", "https"):
        try:
            return download(archive_uri, Path(tempfile.mkdtemp(prefix="recsys-model-")))
        except OSError as exc:
            raise EmbeddingsError(f"cannot download {archive_uri}: {exc}") from exc
    # s3://, pvc://: mounted or fetched by the platform, then given as embeddings_path
    raise EmbeddingsError(f"cannot fetch {archive_uri}: give its local path as embeddings_path")


class EmbeddingCatalog:
    """The loaded item embeddings by model version, kept in step with their files."""

    def __init__(
        self,
        root: Path | None,
        model_version: str | None = None,
        archive_uri: str | None = None,
        archive_uris: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.model_version = model_version
        self.archive_uri = archive_uri
        self.archive_uris = dict(archive_uris or {})
        self._archive: Path | None = None
        self._fetched: dict[str, Path] = {}
        self._loaded: dict[str, ItemEmbeddings] = {}
        self._signatures: dict[str, tuple[int, ...]] = {}

    @property
    def versions(self) -> Mapping[str, ItemEmbeddings]:
        return self._loaded

    @property
    def has_sources(self) -> bool:
        return self.root is not None or self.archive_uri is not None or bool(self.archive_uris)

    def _archive_path(self) -> Path | None:
        """The local path of `archive_uri` (downloaded on first use), or None."""
        if self.archive_uri is None or self._archive is not None:
            return self._archive
        self._archive = local_copy(self.archive_uri)
        return self._archive

    def _versioned_archives(self) -> dict[str, Path]:
        """`archive_uris` as local paths; one that cannot be fetched is logged and skipped
        (and tried again on the next refresh), so one bad URI never hides the others."""
        for version, uri in self.archive_uris.items():
            if version not in self._fetched:
                try:
                    self._fetched[version] = local_copy(uri)
                except EmbeddingsError as exc:
                    log.error("item embeddings of %s unavailable: %s", version, exc)
        return dict(self._fetched)

    def _sources(self) -> dict[str, Path]:
        """model version -> the directory or archive holding its embeddings, as things are now."""
        sources: dict[str, Path] = self._versioned_archives()
        archive = self._archive_path()
        if archive is not None:
            sources[self._named_version(archive)] = archive
        if self.root is None or not self.root.exists():
            return sources
        if holds_embeddings(self.root):
            sources[self._named_version(self.root)] = self.root
            return sources
        for child in sorted(self.root.iterdir()):
            if holds_embeddings(child):
                version = child.stem if child.is_file() else child.name
                sources.setdefault(version, child)
        return sources

    def _named_version(self, path: Path) -> str:
        if not self.model_version:
            raise EmbeddingsError(
                f"{path} holds one model's embeddings: set model_version to name it"
            )
        return self.model_version

    def refresh(self) -> bool:
        """Load new or changed versions and forget removed ones; True when anything changed.

        A version whose files cannot be loaded keeps its previous embeddings (a
        half-copied archive must not stop the job); the error is logged.
        """
        changed = False
        found = self._sources()
        for version in set(self._loaded) - set(found):
            del self._loaded[version]
            self._signatures.pop(version, None)
            changed = True
        for version, path in found.items():
            try:
                signature = _signature(path)
                if self._signatures.get(version) == signature:
                    continue
                self._loaded[version] = ItemEmbeddings.from_path(version, path)
                self._signatures[version] = signature
                changed = True
                log.info("loaded item embeddings of %s from %s", version, path)
            except (OSError, EmbeddingsError) as exc:
                log.error("cannot load item embeddings of %s: %s", version, exc)
        return changed
