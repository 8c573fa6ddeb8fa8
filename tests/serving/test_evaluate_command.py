"""`recsys evaluate` on a tiny model and files whose answer is worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from model_handlers.ease import EaseUserTower
from model_handlers.two_tower import TowerConfig, save_user_tower
from recsys_operator.cli import app

ITEMS = ["A", "B", "C", "D", "E"]
PREFERENCE = [1.0, 2.0, 3.0, 4.0, 5.0]
"""Every user's scores rank E > D > C > B > A (times the history length)."""


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model whose query is the sum of one-hot rows of the history and whose item j's
    vector is PREFERENCE[j] * ones: a fixed ranking, whatever the history."""
    config = TowerConfig(
        num_users=1, num_items=5, num_categories=1, dim=5, hidden=0, history_length=10, kind="ease"
    )
    tower = EaseUserTower(config)
    with torch.no_grad():
        tower.history_embedding.weight.copy_(torch.cat([torch.zeros(1, 5), torch.eye(5)]))
        tower.user_embedding.weight.zero_()
    directory = tmp_path / "model"
    save_user_tower(tower, directory)
    (directory / "user_ids.json").write_text(json.dumps(["someone-else"]))
    (directory / "item_ids.json").write_text(json.dumps(ITEMS))
    vectors = np.array([[p] * 5 for p in PREFERENCE], dtype=np.float32)
    np.save(directory / "item_embeddings.npy", vectors)
    return directory


def _csv(path: Path, rows: list[tuple[str, str, int]]) -> Path:
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    return path


def test_evaluate_scores_a_held_out_file(model_dir: Path, tmp_path: Path) -> None:
    train = _csv(
        tmp_path / "train.csv", [("u1", "A", 1), ("u1", "B", 2), ("u2", "A", 1), ("u3", "C", 1)]
    )
    test = _csv(
        tmp_path / "test.csv",
        # u3's only test item is unknown to the model (a miss); u4 has no history (left out).
        [("u1", "D", 3), ("u1", "C", 4), ("u2", "B", 2), ("u3", "Z", 2), ("u4", "A", 9)],
    )
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--model",
            str(model_dir),
            "--train",
            str(train),
            "--test",
            str(test),
            "-o",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    # u1 (A, B excluded) gets E, D, C: hits at ranks 2 and 3 of its 2 targets.
    # u2 (A excluded) gets E, D, C, B: a hit at rank 4. u3 cannot hit Z.
    ndcg_u1 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    ndcg_u2 = 1 / math.log2(5)
    assert out["users"] == 3
    assert out["metrics"]["recall@10"] == pytest.approx((1 + 1 + 0) / 3, abs=1e-6)
    assert out["metrics"]["ndcg@10"] == pytest.approx((ndcg_u1 + ndcg_u2) / 3, abs=1e-6)
    assert out["metrics"]["mrr@10"] == pytest.approx((1 / 2 + 1 / 4) / 3, abs=1e-6)
    assert out["metrics"]["coverage@10"] == pytest.approx(1.0)


def test_evaluate_refuses_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    data = _csv(tmp_path / "t.csv", [("u", "A", 1)])
    result = CliRunner().invoke(
        app, ["evaluate", "--model", str(tmp_path), "--train", str(data), "--test", str(data)]
    )
    assert result.exit_code == 1 and "not a model directory" in result.output


def test_evaluate_reads_what_train_reads_a_synth_folder_or_its_npz(
    model_dir: Path, tmp_path: Path
) -> None:
    from model_handlers.interaction_files import load_interactions

    train = _csv(tmp_path / "train.csv", [("u1", "A", 1), ("u1", "B", 2), ("u2", "A", 1)])
    test = _csv(tmp_path / "test.csv", [("u1", "D", 3), ("u2", "B", 2)])
    folder = tmp_path / "synth"  # the layout `recsys data synth` writes
    folder.mkdir()
    load_interactions(train).save(folder / "interactions.npz")

    def scores(train_arg: Path) -> dict[str, float]:
        args = ["--model", str(model_dir), "--train", str(train_arg), "--test", str(test)]
        result = CliRunner().invoke(app, ["evaluate", *args, "-o", "json"])
        assert result.exit_code == 0, result.output
        return dict(json.loads(result.stdout)["metrics"])

    from_csv = scores(train)
    assert scores(folder) == from_csv
    assert scores(folder / "interactions.npz") == from_csv
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = CliRunner().invoke(
        app, ["evaluate", "--model", str(model_dir), "--train", str(empty), "--test", str(test)]
    )
    assert missing.exit_code == 1
    assert f"no interactions at {empty / 'interactions.npz'}; run `recsys data synth`" in (
        missing.output
    )
