"""Reading an interaction log from a file: MovieLens rating files, or any CSV/Parquet
with named user, item and time columns (and optionally a weight column).

| file | read as |
|---|---|
| `u.data`, `ratings.dat`, MovieLens `ratings.csv` (`userId,movieId,rating,timestamp`) | `movielens.load_movielens` |
| `.parquet` / `.pq`, other `.csv` | the columns `--user-col`, `--item-col`, `--time-col` (and `--weight-col`) |

Ids are kept as strings (integers print as themselves), so they round-trip to the
archive and the served answers. Times may be numbers (seconds, or milliseconds when
they are larger than any second count in this century) or timestamps. Rows whose
weight is below `min_weight` are dropped (implicit feedback from ratings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_handlers.interactions import Interactions, from_id_columns
from model_handlers.movielens import load_movielens

MOVIELENS_NAMES = ("u.data", "ratings.dat")
SECONDS_LIMIT = 10**11
"""A time above this is taken to be in milliseconds (10¹¹ s is the year 5138)."""


class InteractionFileError(ValueError):
    """The file cannot be read as an interaction log; says why."""


@dataclass(frozen=True)
class Columns:
    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    weight: str | None = None


def load_interactions(
    path: Path, columns: Columns = Columns(), *, min_weight: float = 0.0
) -> Interactions:
    """The interaction log in `path`, sorted by time."""
    if not path.is_file():
        raise FileNotFoundError(f"interaction file not found: {path}")
    if path.name in MOVIELENS_NAMES or _is_movielens_csv(path):
        return load_movielens(path, min_rating=min_weight)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    elif suffix in (".csv", ".tsv", ".txt"):
        import pyarrow.csv as pacsv

        delimiter = "\t" if suffix == ".tsv" else ","
        try:
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
        except Exception as exc:  # pyarrow raises its own ArrowInvalid
            raise InteractionFileError(f"{path}: not a readable CSV file: {exc}") from None
    else:
        raise InteractionFileError(
            f"{path}: unknown format; give u.data, ratings.dat, ratings.csv, .csv or .parquet"
        )
    wanted = [columns.user, columns.item, columns.time] + (
        [columns.weight] if columns.weight else []
    )
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise InteractionFileError(
            f"{path}: no column {', '.join(map(repr, missing))}; the file has "
            f"{', '.join(table.column_names)} (choose with --user-col/--item-col/--time-col)"
        )
    if table.num_rows == 0:
        raise InteractionFileError(f"{path}: no rows")
    users = _strings(table.column(columns.user).to_pylist(), columns.user, path)
    items = _strings(table.column(columns.item).to_pylist(), columns.item, path)
    times = _milliseconds(table.column(columns.time), columns.time, path)
    keep = np.ones(len(users), dtype=bool)
    if columns.weight:
        weights = np.asarray(table.column(columns.weight).to_pylist(), dtype=np.float64)
        keep = weights >= min_weight
        if not keep.any():
            raise InteractionFileError(f"{path}: no row has {columns.weight} >= {min_weight}")
    log = from_id_columns(users[keep], items[keep], times[keep])
    return log.sorted_by_time()


def _is_movielens_csv(path: Path) -> bool:
    if path.suffix.lower() != ".csv":
        return False
    with open(path, encoding="latin-1") as f:
        header = f.readline().strip().lower()
    return header.startswith("userid,movieid,rating,timestamp")


def _strings(values: list[object], name: str, path: Path) -> np.ndarray:
    if any(v is None for v in values):
        raise InteractionFileError(f"{path}: column {name!r} has empty values")
    return np.asarray([str(v) for v in values], dtype=object)


def _milliseconds(column: object, name: str, path: Path) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    array = column  # a pyarrow ChunkedArray
    kind = array.type  # type: ignore[attr-defined]
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        ms = pc.cast(pc.cast(array, pa.timestamp("ms")), pa.int64())
        return np.asarray(ms.to_pylist(), dtype=np.int64)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            ms = pc.cast(pc.cast(array, pa.timestamp("ms")), pa.int64())
        except Exception:
            raise InteractionFileError(
                f"{path}: column {name!r} holds neither numbers nor timestamps"
            ) from None
        return np.asarray(ms.to_pylist(), dtype=np.int64)
    values = np.asarray(array.to_pylist(), dtype=np.float64)  # type: ignore[attr-defined]
    if np.isnan(values).any():
        raise InteractionFileError(f"{path}: column {name!r} has empty values")
    scale = 1 if values.max() > SECONDS_LIMIT else 1000
    return (values * scale).astype(np.int64)
