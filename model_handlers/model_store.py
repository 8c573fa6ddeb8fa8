"""The model store a training run reads the stable archive from and publishes into.

A folder of `<name>-<version>.mar` archives and training verdicts
(`recsys_contracts.archive_layout`, `recsys_contracts.training_report`), named by URI:
a local path or file:// (local mode, a mounted PVC in a cluster) or s3://BUCKET/PREFIX,
opened as the event log is (`recsys_contracts.file_store`, which says where S3
credentials come from).

What a reader must never see is half a file: text is written with
`file_store.write_durably` (locally a temporary file renamed into place, fsynced; on S3
one PUT); an archive is moved into a local store whole, or uploaded whole to S3.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from recsys_contracts import file_store


class ModelStore:
    def __init__(self, uri: str | Path, storage_options: dict[str, Any] | None = None):
        text = str(uri)
        self.uri = text.rstrip("/")
        self._fs, self._root = file_store.open_root(text, storage_options, what="model store")
        self.local = Path(self._root) if file_store.is_local(self._fs) else None

    def location(self, name: str) -> str:
        """Where `name` lies, for messages: a path, or the store's URI and the name."""
        return str(self.local / name) if self.local is not None else f"{self.uri}/{name}"

    def _path(self, name: str) -> str:
        return f"{self._root}/{name}"

    def exists(self, name: str) -> bool:
        """Whether the store holds the file; a store that cannot be reached raises (OSError
        or botocore's errors) rather than reading as empty."""
        try:
            return bool(self._fs.info(self._path(name))["type"] == "file")
        except FileNotFoundError:
            return False

    def fetch(self, name: str, target: Path) -> Path:
        """Copy `name` to the local file `target` (a local store's file is read in place)."""
        if self.local is not None:
            return self.local / name
        self._fs.get(self._path(name), str(target))
        return target

    def publish(self, source: Path, name: str) -> None:
        """Put the local file `source` into the store as `name` (moved when the store is local)."""
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            if source != self.local / name:
                os.replace(source, self.local / name)
            return
        self._fs.put_file(str(source), self._path(name))

    def write_text(self, name: str, text: str) -> None:
        file_store.write_durably(self._fs, self._path(name), text.encode())

    def read_text(self, name: str) -> str | None:
        """The file's text; None when there is none."""
        try:
            return bytes(self._fs.cat_file(self._path(name))).decode()
        except FileNotFoundError:
            return None
