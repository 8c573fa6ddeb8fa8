"""The quality benchmark's quick mode runs end to end (its figures are recorded in
benchmarks/README.md, not asserted here beyond sanity)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_quality_benchmark_quick_mode(tmp_path: Path) -> None:
    path = Path(__file__).parents[2] / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_benchmark", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "quality.json"
    assert module.main(["--quick", "--json", str(out)]) == 0
    (runs,) = json.loads(out.read_text()).values()
    run = runs[0]
    for model in ("popularity", "item_knn", "als", "ease_l200", "ease", "two_tower"):
        assert 0 <= run[model]["ndcg@10"] <= 1, model
    assert run["users"] > 200
    # The default model is not worse than the popularity peer on any synthetic world.
    assert run["ease"]["ndcg@10"] > run["popularity"]["ndcg@10"]
