"""`recsys data synth`, `recsys train` and `recsys archive` end to end on a small world."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recsys_operator.cli import app


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize("command", [["data", "synth"], ["train"], ["evaluate"], ["archive"]])
def test_every_command_has_help(runner: CliRunner, command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_synth_train_archive(runner: CliRunner, tmp_path: Path) -> None:
    data, model, store = tmp_path / "data", tmp_path / "model", tmp_path / "store"
    result = runner.invoke(
        app,
        ["data", "synth", "--out", str(data), "--users", "400", "--items", "600", "--seed", "3"],
    )
    assert result.exit_code == 0, result.output
    assert (data / "interactions.npz").is_file() and (data / "synthetic.json").is_file()

    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            "two_tower",
            "--data",
            str(data),
            "--out",
            str(model),
            "--dim",
            "8",
            "--epochs",
            "2",
            "--history",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "two_tower" in result.output and "popularity" in result.output
    assert (model / "metrics.json").is_file() and (model / "user_tower.pt").is_file()

    args = [
        "archive",
        "--model-dir",
        str(model),
        "--out",
        str(store),
        "--version",
        "7",
        "--top-k",
        "20",
    ]
    result = runner.invoke(
        app, [*args, "--index", "HNSW", "--hnsw-m", "8", "--hnsw-ef-search", "32"]
    )
    assert result.exit_code == 0, result.output
    assert "recall@10" in result.output
    with zipfile.ZipFile(store / "retrieval-7.mar") as z:
        assert "item_index.faiss" in z.namelist()

    again = runner.invoke(app, [*args, "--index", "Flat"])
    assert again.exit_code == 1 and "exists" in again.output
    bad = runner.invoke(
        app,
        [*args, "--force", "--index", "IVF-PQ", "--pq-m", "3", "--ivf-nlist", "8", "--nprobe", "4"],
    )
    assert bad.exit_code == 1 and "model.index.ivfpq.m: m 3 must divide" in bad.output


def test_clear_errors_for_missing_inputs(runner: CliRunner, tmp_path: Path) -> None:
    missing = runner.invoke(
        app, ["train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")]
    )
    assert missing.exit_code == 1 and "run `recsys data synth` first" in missing.output
    bad_file = tmp_path / "u.data"
    bad_file.write_text("not ratings\n")
    result = runner.invoke(
        app, ["train", "--movielens", str(bad_file), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 1 and "not a MovieLens ratings file" in result.output
    no_model = runner.invoke(
        app, ["archive", "--model-dir", str(tmp_path), "--out", str(tmp_path / "s")]
    )
    assert no_model.exit_code == 1 and "run `recsys train` first" in no_model.output
    bad_index = runner.invoke(app, ["archive", "--model-dir", str(tmp_path), "--index", "Annoy"])
    assert bad_index.exit_code == 1 and "invalid index parameters" in bad_index.output
