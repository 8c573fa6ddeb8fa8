"""The model store a training run reads the stable archive from and publishes into.

A folder of `<name>-<version>.mar` archives and training verdicts
(`recsys_contracts.archive_layout`, `recsys_contracts.training_report`), named by URI:
a local path or file:// (local mode, a mounted PVC in a cluster) or s3://BUCKET/PREFIX,
through fsspec and s3fs as the event log is (`recsys_contracts.event_log_layout`). For
S3, credentials and the endpoint come from `storage_options` (s3fs's `key`, `secret`,
`endpoint_url`) or botocore's environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...; in
a cluster, the pod's service account).

What a reader must never see is half a file: a local write goes to `<file>.partial`
and is renamed into place; an S3 object appears whole when its upload completes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


class ModelStore:
    def __init__(self, uri: str | Path, storage_options: dict[str, Any] | None = None):
        from fsspec.core import url_to_fs

        text = str(uri)
        if not text:
            raise ValueError("the model store URI is empty")
        parsed = urlparse(text)
        self.uri = text.rstrip("/")
        self.local: Path | None = None
        if not parsed.scheme or parsed.scheme == "file":
            self.local = Path(parsed.path if parsed.scheme == "file" else text)
        self._fs, root = url_to_fs(text, **(storage_options or {}))
        self._root = root.rstrip("/")

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
        if self.local is not None:
            path = self.local / name
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            partial.write_text(text)
            os.replace(partial, path)
            return
        self._fs.pipe_file(self._path(name), text.encode())

    def read_text(self, name: str) -> str | None:
        """The file's text; None when there is none."""
        if not self.exists(name):
            return None
        return bytes(self._fs.cat_file(self._path(name))).decode()
