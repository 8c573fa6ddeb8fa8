"""`recsys tune` searches on the validation holdout and `recsys train --config` uses
what it found."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from model_handlers.interactions import Interactions
from recsys_operator.cli import app


def test_tune_writes_settings_that_train_uses(tiny_log: Interactions, tmp_path: Path) -> None:
    data = tmp_path / "interactions.npz"
    tiny_log.save(data)
    runner = CliRunner()
    tuned = tmp_path / "tuned.json"
    result = runner.invoke(
        app, ["tune", "--data", str(data), "--trials", "4", "--out", str(tuned), "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("trial ") >= 4 and "best validation ndcg@10" in result.output
    written = json.loads(tuned.read_text())
    l2 = written["training"]["ease"]["l2_grid"]
    assert len(l2) == 1 and 10 <= l2[0] <= 10_000
    assert written["trials"] == 4 and 0 < written["validation_ndcg_at_10"] <= 1

    model = tmp_path / "model"
    result = runner.invoke(
        app, ["train", "--data", str(data), "--config", str(tuned), "--out", str(model)]
    )
    assert result.exit_code == 0, result.output
    selected = json.loads((model / "metrics.json").read_text())["training"]["selected"]
    assert selected["l2"] == l2[0]


def test_a_config_with_unknown_settings_is_refused(tiny_log: Interactions, tmp_path: Path) -> None:
    data = tmp_path / "interactions.npz"
    tiny_log.save(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": {"model": "ease", "learning_rat": 0.1}}))
    result = CliRunner().invoke(
        app, ["train", "--data", str(data), "--config", str(bad), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 1 and "unknown training settings learning_rat" in result.output


def test_a_config_that_cannot_be_read_is_refused_before_any_data_is_made(tmp_path: Path) -> None:
    # Without --data, train would first generate the default synthetic dataset.
    not_json = tmp_path / "tuned.json"
    not_json.write_text("{l2: 400}")
    runner = CliRunner()
    for config, reason in (
        (tmp_path / "missing.json", f"--config {tmp_path / 'missing.json'}: no such file"),
        (not_json, f"{not_json}: not JSON ("),
    ):
        result = runner.invoke(
            app, ["train", "--config", str(config), "--out", str(tmp_path / "m")]
        )
        assert result.exit_code == 1, result.output
        assert reason in result.output
        assert "training ease on" not in result.output  # nothing was loaded or generated
        assert isinstance(result.exception, SystemExit)


def test_the_training_line_names_the_model_of_the_config(
    tiny_log: Interactions, tmp_path: Path
) -> None:
    data = tmp_path / "interactions.npz"
    tiny_log.save(data)
    tuned = tmp_path / "tuned.json"
    settings = {"model": "two_tower", "max_epochs": 1, "min_epochs": 1, "dim": 8}
    tuned.write_text(json.dumps({"training": settings}))
    result = CliRunner().invoke(
        app, ["train", "--data", str(data), "--config", str(tuned), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    assert f"training two_tower on {data}" in result.output
