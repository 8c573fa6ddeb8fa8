"""Docs derived from the models stay in sync with them."""

from __future__ import annotations

from pathlib import Path

from recsys_operator.api.recommender_system import RecommenderSystemSpec
from recsys_operator.api_reference import render_api_reference

ROOT = Path(__file__).resolve().parents[2]


def test_api_reference_is_up_to_date() -> None:
    assert (ROOT / "docs" / "api-reference.md").read_text() == render_api_reference(), (
        "run `recsys docs` to regenerate docs/api-reference.md"
    )


def test_api_reference_documents_every_field() -> None:
    text = render_api_reference()
    for name, info in RecommenderSystemSpec.model_fields.items():
        assert f"| `{info.alias or name}` |" in text
    assert "| `maxBatchDelayMs` | int | `5` |" in text
    assert "| `steps` | list of int | `[10, 25, 50, 100]` |" in text
