"""Load MovieLens rating files given by path (nothing is downloaded).

Formats, recognised by their separator:

| file | line | dataset |
|---|---|---|
| `u.data` | `user<TAB>item<TAB>rating<TAB>timestamp` | ml-100k |
| `ratings.dat` | `user::item::rating::timestamp` | ml-1m, ml-10m |
| `ratings.csv` | `userId,movieId,rating,timestamp` with a header line | ml-latest, ml-20m, ml-25m |

Every rating at or above `min_rating` becomes one interaction (implicit feedback);
timestamps are seconds in the files and milliseconds here. Items have no category.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model_handlers.interactions import Interactions, from_id_columns


class MovieLensFormatError(ValueError):
    """The file is not one of the MovieLens rating formats."""


def _separator(first_line: str) -> str:
    if "::" in first_line:
        return "::"
    if "\t" in first_line:
        return "\t"
    if "," in first_line:
        return ","
    raise MovieLensFormatError(
        "not a MovieLens ratings file: expected u.data (tab-separated), ratings.dat ('::') "
        f"or ratings.csv (','); first line is {first_line[:80]!r}"
    )


def parse_movielens(text: str, *, min_rating: float = 0.0) -> Interactions:
    """Interactions from the text of a MovieLens ratings file."""
    lines = text.splitlines()
    if not lines:
        raise MovieLensFormatError("the ratings file is empty")
    separator = _separator(lines[0])
    if lines[0].split(separator)[0].strip().lower() in {"userid", "user_id", "user"}:
        lines = lines[1:]  # ratings.csv header
    rows = [line.split(separator) for line in lines if line.strip()]
    if not rows:
        raise MovieLensFormatError("the ratings file has no ratings")
    bad = next((n for n, row in enumerate(rows) if len(row) < 4), None)
    if bad is not None:
        raise MovieLensFormatError(
            f"line {bad + 1}: expected user, item, rating and timestamp, got {lines[bad]!r}"
        )
    try:
        users = np.array([int(row[0]) for row in rows], dtype=np.int64)
        items = np.array([int(row[1]) for row in rows], dtype=np.int64)
        ratings = np.array([float(row[2]) for row in rows], dtype=np.float64)
        seconds = np.array([int(row[3]) for row in rows], dtype=np.int64)
    except ValueError as exc:
        raise MovieLensFormatError(f"a field is not a number: {exc}") from None
    keep = ratings >= min_rating
    if not keep.any():
        raise MovieLensFormatError(f"no rating is at least {min_rating}")
    log = from_id_columns(users[keep], items[keep], seconds[keep] * 1000)
    return log.sorted_by_time()


def load_movielens(path: Path, *, min_rating: float = 0.0) -> Interactions:
    """Interactions from a MovieLens ratings file (`u.data`, `ratings.dat`, `ratings.csv`)."""
    if not path.is_file():
        raise FileNotFoundError(f"MovieLens ratings file not found: {path}")
    return parse_movielens(path.read_text(encoding="latin-1"), min_rating=min_rating)
