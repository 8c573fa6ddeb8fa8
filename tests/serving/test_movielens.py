"""MovieLens rating files, given by path, in their three formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_handlers.movielens import MovieLensFormatError, load_movielens

U_DATA = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n196\t302\t5\t881250000\n"
RATINGS_DAT = "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
RATINGS_CSV = "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n7,31,4.5,1260759100\n"


@pytest.mark.parametrize(
    ("name", "text", "rows", "users", "items", "earliest"),
    [
        ("u.data", U_DATA, 4, ["22", "186", "196"], ["242", "302", "377"], ("22", "377")),
        ("ratings.dat", RATINGS_DAT, 3, ["1", "2"], ["661", "1193"], ("2", "1193")),
        ("ratings.csv", RATINGS_CSV, 3, ["1", "7"], ["31", "1029"], ("7", "31")),
    ],
)
def test_each_format_loads(
    tmp_path: Path,
    name: str,
    text: str,
    rows: int,
    users: list[str],
    items: list[str],
    earliest: tuple[str, str],
) -> None:
    path = tmp_path / name
    path.write_text(text)
    log = load_movielens(path)
    assert len(log) == rows
    assert log.user_ids == users and log.item_ids == items
    assert (np.diff(log.timestamp_ms) >= 0).all()
    assert log.timestamp_ms.min() >= 878_887_116_000  # seconds became milliseconds
    assert log.category_names == ["unknown"]
    # Chronological order: the first row is the earliest rating.
    assert (log.user_ids[log.user[0]], log.item_ids[log.item[0]]) == earliest


def test_min_rating_keeps_only_good_ratings(tmp_path: Path) -> None:
    path = tmp_path / "u.data"
    path.write_text(U_DATA)
    log = load_movielens(path, min_rating=4)
    assert len(log) == 1 and log.user_ids == ["196"] and log.item_ids == ["302"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("hello world\n", "not a MovieLens ratings file"),
        ("1\t2\t3\n", "expected user, item, rating and timestamp"),
        ("1\tx\t3\t4\n", "not a number"),
    ],
)
def test_malformed_files_are_refused_with_the_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "u.data"
    path.write_text(text)
    with pytest.raises(MovieLensFormatError, match=message):
        load_movielens(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.dat"):
        load_movielens(tmp_path / "nope.dat")
