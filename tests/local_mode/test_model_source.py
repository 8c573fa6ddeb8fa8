"""Where local mode's archives come from, and when one in the store is reused."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys_operator.api.recommender_system import IndexSpec, ModelSpec
from recsys_operator.local.model_source import prepare_model
from recsys_operator.local.run_folder import RunFolder

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("local-mode")]


def model(**changes: object) -> ModelSpec:
    fields = {
        "name": "tiny",
        "version": "1",
        "embedding_dim": 4,
        "num_items": 60,
        "top_k": 5,
        "index": IndexSpec(type="Flat"),
    }
    return ModelSpec(**{**fields, **changes})


def test_an_archive_is_reused_only_for_the_spec_it_was_built_for(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    said: list[str] = []
    first = prepare_model(folder, model(), say=said.append)
    assert first.origin == "trained on synthetic data" and first.archive.is_file()
    built_at = first.archive.stat().st_mtime_ns

    again = prepare_model(folder, model(), say=said.append)
    assert again.archive.stat().st_mtime_ns == built_at  # same spec: reused, not rebuilt

    resized = prepare_model(folder, model(num_items=80), say=said.append)
    assert resized.archive.stat().st_mtime_ns != built_at  # another shape: rebuilt
    assert any("80 items" in line for line in said)

    broken = prepare_model(folder, model(num_items=80), random_embeddings=True, say=said.append)
    assert "random" in broken.origin
    fixed = prepare_model(folder, model(num_items=80), say=said.append)
    assert fixed.origin == "trained on synthetic data"  # the broken one is never reused
    # The feature job finds the served version's item vectors under embeddings/.
    assert (folder.embeddings / "1.mar").resolve() == fixed.archive.resolve()


def test_an_archive_uri_this_machine_cannot_reach_is_said_before_training(tmp_path: Path) -> None:
    said: list[str] = []
    prepared = prepare_model(
        RunFolder(tmp_path / "run"),
        model(archive_uri="http://127.0.0.1:9/tiny-1.mar"),  # discard port: refused
        say=said.append,
    )
    assert prepared.origin == "trained on synthetic data"
    assert any("cannot be read from this machine" in line for line in said), said
