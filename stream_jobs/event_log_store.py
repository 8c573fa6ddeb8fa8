"""The event log's files: durable writes, the ids of recent files, and compaction.

A write is durable when it returns (`recsys_contracts.file_store.write_durably`: in a
folder a temporary file, fsynced and renamed into place; in an object store one PUT of
the whole file). The sink acks messages only after that, so a crash loses nothing, and
at worst writes a batch twice.

File names carry their write time (`batch-<ms>-<random>.parquet`), so a restarted sink
finds the files a crash may have left unacknowledged without reading the whole log.
Compaction writes a partition's rows, duplicates dropped, into one file and only then
deletes the files it read: a crash in between leaves duplicates, never a gap.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recsys_contracts import event_log_layout as layout
from recsys_contracts import file_store


@dataclass(frozen=True)
class WrittenFile:
    path: str
    rows: int
    bytes: int


@dataclass(frozen=True)
class Compaction:
    table: str
    partition: tuple[str, str]
    files_in: int
    rows_in: int
    written: WrittenFile

    @property
    def duplicates(self) -> int:
        return self.rows_in - self.written.rows


def write_time_ms(path: str) -> int | None:
    """When the file at `path` was written, from its name (None: not one of ours)."""
    name = path.rsplit("/", 1)[-1]
    for prefix in (layout.BATCH_PREFIX, layout.COMPACTED_PREFIX):
        if name.startswith(prefix):
            stamp = name[len(prefix) :].split("-", 1)[0]
            return int(stamp) if stamp.isdigit() else None
    return None


class EventLogStore:
    """One log root (folder or object store) and the operations the sink needs on it."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.fs, self.root = layout.open_root(uri, storage_options)
        self.is_local = file_store.is_local(self.fs)

    # --- writing -------------------------------------------------------------------

    def write(
        self,
        table: str,
        partition: tuple[str, str],
        rows: pa.Table,
        prefix: str = layout.BATCH_PREFIX,
    ) -> WrittenFile:
        """Write `rows` as one new file of the partition; durable when this returns."""
        buffer = io.BytesIO()
        pq.write_table(rows.cast(layout.schema(table)), buffer, compression="zstd")
        data = buffer.getvalue()
        folder = f"{self.root}/{layout.partition_dir(table, *partition)}"
        name = f"{prefix}{time.time_ns() // 1_000_000:013d}-{uuid.uuid4().hex[:12]}"
        path = f"{folder}/{name}{layout.PARQUET_SUFFIX}"
        file_store.write_durably(self.fs, path, data)
        return WrittenFile(path, rows.num_rows, len(data))

    # --- reading back ---------------------------------------------------------------

    def files(self, table: str) -> list[str]:
        return layout.data_files(self.fs, self.root, table)

    def partition_files(self, table: str, partition: tuple[str, str]) -> list[str]:
        folder = f"{self.root}/{layout.partition_dir(table, *partition)}"
        self.fs.invalidate_cache(folder)  # other writers' files appear in a fresh listing only
        if not self.fs.exists(folder):
            return []
        names = self.fs.ls(folder, detail=False)
        return sorted(
            p
            for p in names
            if p.endswith(layout.PARQUET_SUFFIX) and not p.rsplit("/", 1)[-1].startswith((".", "_"))
        )

    def read_files(self, paths: list[str], columns: list[str] | None = None) -> pa.Table:
        tables = []
        for path in paths:
            with self.fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle, columns=columns))
        return pa.concat_tables(tables) if tables else pa.table({})

    def recent_files(self, table: str, written_since_ms: int) -> list[str]:
        """The files of `table` written at or after `written_since_ms` (by their names)."""
        return [
            p
            for p in self.files(table)
            if (write_time_ms(p) or written_since_ms) >= written_since_ms
        ]

    # --- compaction -----------------------------------------------------------------

    def compact(self, table: str, partition: tuple[str, str], files: list[str]) -> Compaction:
        """Merge `files` of one partition into one file without duplicates, then delete them."""
        rows = self.read_files(files)
        unique = layout.drop_duplicates(rows, layout.DEDUP_KEYS[table]).sort_by("ts")
        written = self.write(table, partition, unique, prefix=layout.COMPACTED_PREFIX)
        for path in files:
            self.fs.rm_file(path)
        if self.is_local:
            file_store.fsync_dir(os.path.dirname(written.path))
        return Compaction(table, partition, len(files), rows.num_rows, written)
