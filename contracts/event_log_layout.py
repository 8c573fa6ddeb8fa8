"""The offline event log: where the sink writes events as Parquet, and how to read them back.

The log lives under one root URI: a folder (`/path`, `file:///path`) or an object store
(`s3://bucket/prefix`, through fsspec and s3fs). Two tables, Hive-partitioned by the UTC
hour of each row's `ts` (event time, not arrival time)::

    <root>/interactions/date=YYYY-MM-DD/hour=HH/<file>.parquet
        event_id, user_id, item_id, type, ts (int64 epoch ms), dwell_ms (int64, nullable),
        request_id (nullable), model_version (nullable)             one row per event
    <root>/impressions/date=YYYY-MM-DD/hour=HH/<file>.parquet
        request_id, user_id, item_id, ts, model_version, clicked (bool), click_ts (nullable),
        event_id (the impression event's), position (0 = the top item)
                                                           one row per item shown

Both read with `pyarrow.dataset.dataset(root + "/interactions", format="parquet",
partitioning="hive")`; `read_interactions` / `read_impressions` below add the time window
and drop the duplicates at-least-once delivery can leave before compaction merges them.
Files whose names start with `.` or `_` are in-flight temporaries (pyarrow skips them).

pyarrow and fsspec are imported inside the functions: the contracts stay importable
by components that never touch the log.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from recsys_contracts import file_store

if TYPE_CHECKING:
    import pyarrow as pa
    from fsspec import AbstractFileSystem

INTERACTIONS_TABLE = "interactions"
IMPRESSIONS_TABLE = "impressions"
TABLES = (INTERACTIONS_TABLE, IMPRESSIONS_TABLE)

DATE_KEY = "date"
HOUR_KEY = "hour"
DATE_FORMAT = "%Y-%m-%d"

INTERACTION_COLUMNS = (
    "event_id",
    "user_id",
    "item_id",
    "type",
    "ts",
    "dwell_ms",
    "request_id",
    "model_version",
)
IMPRESSION_COLUMNS = (
    "request_id",
    "user_id",
    "item_id",
    "ts",
    "model_version",
    "clicked",
    "click_ts",
    "event_id",
    "position",
)
DEDUP_KEYS = {INTERACTIONS_TABLE: ("event_id",), IMPRESSIONS_TABLE: ("event_id", "position")}
"""What makes a row unique in each table: a redelivered event writes the same key again."""

BATCH_PREFIX = "batch-"
COMPACTED_PREFIX = "compacted-"
PARQUET_SUFFIX = ".parquet"


def schema(table: str) -> pa.Schema:
    """The Arrow schema of the files of `table` (partition keys are in the path only)."""
    import pyarrow as pa

    string, int64 = pa.string(), pa.int64()
    if table == INTERACTIONS_TABLE:
        return pa.schema(
            [
                pa.field("event_id", string, nullable=False),
                pa.field("user_id", string, nullable=False),
                pa.field("item_id", string, nullable=False),
                pa.field("type", string, nullable=False),
                pa.field("ts", int64, nullable=False),
                pa.field("dwell_ms", int64),
                pa.field("request_id", string),
                pa.field("model_version", string),
            ]
        )
    if table == IMPRESSIONS_TABLE:
        return pa.schema(
            [
                pa.field("request_id", string),
                pa.field("user_id", string, nullable=False),
                pa.field("item_id", string, nullable=False),
                pa.field("ts", int64, nullable=False),
                pa.field("model_version", string),
                pa.field("clicked", pa.bool_(), nullable=False),
                pa.field("click_ts", int64),
                pa.field("event_id", string, nullable=False),
                pa.field("position", pa.int32(), nullable=False),
            ]
        )
    raise ValueError(f"the event log has no table {table!r} (tables: {', '.join(TABLES)})")


def partition_of(ts_ms: int) -> tuple[str, str]:
    """(date, hour) of the partition holding an event at `ts_ms` (UTC)."""
    moment = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return moment.strftime(DATE_FORMAT), f"{moment.hour:02d}"


def partition_dir(table: str, date: str, hour: str) -> str:
    """The partition's folder relative to the root: `interactions/date=.../hour=...`."""
    return f"{table}/{DATE_KEY}={date}/{HOUR_KEY}={hour}"


def open_root(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, root path in it) for a log URI: a path, file:// or s3://
    (`file_store.open_root`, which says where S3 credentials come from)."""
    return file_store.open_root(uri, storage_options, what="event log")


def read_interactions(
    uri: str, since_ms: int, until_ms: int, storage_options: dict[str, Any] | None = None
) -> pa.Table:
    """The interaction events with `since_ms <= ts < until_ms`, each event once, by `ts`."""
    return read_table(INTERACTIONS_TABLE, uri, since_ms, until_ms, storage_options)


def read_impressions(
    uri: str, since_ms: int, until_ms: int, storage_options: dict[str, Any] | None = None
) -> pa.Table:
    """The impressions (one row per item shown, with `clicked`) in [since_ms, until_ms)."""
    return read_table(IMPRESSIONS_TABLE, uri, since_ms, until_ms, storage_options)


def read_table(
    table: str,
    uri: str,
    since_ms: int,
    until_ms: int,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """Rows of `table` in [since_ms, until_ms), duplicates dropped, sorted by `ts`.

    Only the partitions that overlap the window are opened. An empty log (or one
    without this table yet) gives an empty table with the table's schema.
    """
    import pyarrow as pa
    import pyarrow.dataset as ds

    target = schema(table)
    if until_ms <= since_ms:
        return target.empty_table()
    fs, root = open_root(uri, storage_options)
    base = f"{root}/{table}"
    keys = pa.schema([(DATE_KEY, pa.string()), (HOUR_KEY, pa.string())])
    first_date, _ = partition_of(since_ms)
    last_date, _ = partition_of(until_ms - 1)
    window = (
        (ds.field(DATE_KEY) >= first_date)
        & (ds.field(DATE_KEY) <= last_date)
        & (ds.field("ts") >= since_ms)
        & (ds.field("ts") < until_ms)
    )

    def read() -> pa.Table:
        if not fs.exists(base):
            return target.empty_table()
        dataset = ds.dataset(
            base,
            schema=pa.unify_schemas([target, keys]),
            format="parquet",
            partitioning=ds.partitioning(keys, flavor="hive"),
            filesystem=fs,
        )
        return dataset.to_table(filter=window, columns=list(target.names))

    rows = read_while_compacting(fs, read)
    return drop_duplicates(rows, DEDUP_KEYS[table]).sort_by("ts")


T = TypeVar("T")
READ_ATTEMPTS = 5


def read_while_compacting(fs: Any, read: Callable[[], T]) -> T:
    """`read()` on a fresh listing of `fs`, again when a file it listed was deleted before
    it was opened: a sink's compaction writes the merged file before it deletes the small
    ones, so a fresh listing holds every row (twice at most; readers drop duplicates)."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        fs.invalidate_cache()  # fsspec reuses instances: a cached listing misses new files
        try:
            return read()
        except FileNotFoundError:
            if attempt == READ_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def drop_duplicates(rows: pa.Table, keys: tuple[str, ...]) -> pa.Table:
    """`rows` with only the first row of each `keys` value (order kept)."""
    import numpy as np
    import pyarrow as pa

    if rows.num_rows == 0:
        return rows
    columns = [rows.column(k).to_numpy(zero_copy_only=False).astype(str) for k in keys]
    combined = (
        columns[0]
        if len(columns) == 1
        else np.char.add(np.char.add(columns[0], "\x1f"), columns[1])
    )
    _, first = np.unique(combined, return_index=True)
    if len(first) == rows.num_rows:
        return rows
    return rows.take(pa.array(np.sort(first)))


def data_files(fs: AbstractFileSystem, root: str, table: str) -> list[str]:
    """Every finished Parquet file of `table` (temporaries left out), sorted by path."""
    pattern = f"{root}/{table}/{DATE_KEY}=*/{HOUR_KEY}=*/*{PARQUET_SUFFIX}"
    fs.invalidate_cache()  # object stores' listings are cached per instance
    names = fs.glob(pattern)
    return sorted(p for p in names if not p.rsplit("/", 1)[-1].startswith((".", "_")))
