"""A store of files named by a URI, and writing a file into it durably.

The event log (`event_log_layout`) and the model store (archives and training verdicts)
each live under one root URI: a folder (`/path`, `file:///path`; a mounted PVC in a
cluster) or an object store (`s3://bucket/prefix`, through fsspec and s3fs). For S3,
credentials and the endpoint come from `storage_options` (s3fs's: `key`, `secret`,
`endpoint_url`, `client_kwargs`) or botocore's usual environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION; in a cluster, the pod's
service account).

A write is durable when it returns, and no reader ever sees half a file: in a folder the
file is written under a temporary name (`.tmp-...`, which readers skip), fsynced, renamed
into place and its folder fsynced (and the parents of any folder it created); in an
object store the PUT of the whole file has returned.

fsspec is imported inside the functions: the contracts stay importable by components
that never touch a store.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

TEMPORARY_PREFIX = ".tmp-"


def open_root(
    uri: str, storage_options: dict[str, Any] | None = None, *, what: str = "store"
) -> tuple[Any, str]:
    """(fsspec filesystem, root path in it, without a trailing /) for a path, file:// or
    s3:// URI; `what` names the store in the error an empty URI gets."""
    from fsspec.core import url_to_fs

    if not uri:
        raise ValueError(f"the {what} URI is empty")
    fs, root = url_to_fs(uri, **(storage_options or {}))
    return fs, root.rstrip("/")


def is_local(fs: AbstractFileSystem) -> bool:
    """Whether `fs` is the local disk (where a durable write needs fsync and rename)."""
    protocol = fs.protocol
    return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))


def write_durably(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Put `data` at `path` of `fs` whole; durable when this returns."""
    if is_local(fs):
        write_local_durably(path, data)
    else:
        fs.pipe_file(path, data)  # one PUT: the object exists whole or not at all


def write_local_durably(path: str, data: bytes) -> None:
    """Write the local file `path`: temporary file, fsync, rename, fsync of the folder."""
    folder = os.path.dirname(path)
    _make_folders_durably(folder)
    temporary = os.path.join(folder, f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    """Make a rename or delete in `folder` survive a power cut (its entry is on disk)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _make_folders_durably(folder: str) -> None:
    """Create `folder` and its missing parents; each new folder is an entry of its
    parent, so the parents are fsynced too."""
    created = []
    current = folder
    while not os.path.isdir(current):
        created.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    if not created:
        return
    os.makedirs(folder, exist_ok=True)
    for new in reversed(created):
        fsync_dir(os.path.dirname(new))
