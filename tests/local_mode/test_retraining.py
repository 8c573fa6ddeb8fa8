"""Retraining in local mode, on real parts: `recsys up` with spec.training runs
`recsys retrain` against the run folder's event log on its local interval.

The stable version serves random item vectors (`--random-embeddings`), so a candidate
trained on what users did beats it for real on the newest held-out slice. Users' views
go through the gateway, the event-log sink writes them as Parquet, and the runs read
them from there. While the log holds too few interactions a run is gated out and
serving is untouched; once it holds enough, the run publishes a candidate and, with
autoRollout, the local rollout starts its canary while system.yaml still says what the
user wrote. Bounded: every wait has a deadline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml

from recsys_operator.local.desired_state import parse_system, read_manifest
from recsys_operator.local.run_folder import RunFolder

from .test_local_mode import MANIFEST, recsys, wait_for_state

pytestmark = [
    pytest.mark.java,
    pytest.mark.redis,
    pytest.mark.broker,
    pytest.mark.prometheus,
    pytest.mark.slow,
    pytest.mark.xdist_group("local-mode"),
]

RETRAIN_EVERY = "20s"
MIN_INTERACTIONS = 1000
TOO_FEW = 200
ENOUGH = 1600
USERS = 160


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunFolder]:
    workdir = tmp_path_factory.mktemp("retrain")
    body: dict[str, Any] = json.loads(json.dumps(MANIFEST))
    body["metadata"]["name"] = "retrain"
    body["spec"]["training"] = {
        # Cluster URIs: local mode reads and writes the run folder instead.
        "logUri": "s3://events/retrain",
        "modelStoreUri": "pvc://models/retrain",
        "minInteractions": MIN_INTERACTIONS,
        "gate": {"metric": "ndcg@10", "minRelativeImprovement": 0.05, "minUsers": 50},
        "autoRollout": True,
    }
    manifest = workdir / "retrain.yaml"
    manifest.write_text(yaml.safe_dump(body))
    folder = RunFolder(workdir / "run")
    result = recsys(
        "up", "-f", str(manifest), "--run-dir", str(folder.root),
        "--random-embeddings", "--retrain-every", RETRAIN_EVERY,
        cwd=workdir,
    )  # fmt: skip
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        yield folder
    finally:
        recsys("down", "--run-dir", str(folder.root), cwd=workdir, timeout=150)


def views(folder: RunFolder, count: int, seed: int) -> list[dict[str, str]]:
    """`count` views by `USERS` users, each drawn from the user's current interests in
    the synthetic world the local model lives in."""
    from model_handlers.synthetic import SyntheticWorld
    from recsys_operator.local.model_source import synthetic_world_config

    model = parse_system(read_manifest(folder.manifest)).spec.model
    world = SyntheticWorld(synthetic_world_config(model))
    users = np.arange(USERS)
    logits = world.config.affinity_sharpness * (
        world.preference_vectors(users, world.end_ms) @ world.item_vectors.T
    )
    logits += 0.5 * world.item_log_popularity
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, USERS, size=count)
    return [
        {
            "type": "view",
            "user_id": world.user_ids[u],
            "item_id": world.item_ids[rng.choice(world.config.items, p=weights[u])],
        }
        for u in chosen
    ]


def send(folder: RunFolder, events: list[dict[str, str]]) -> None:
    gateway = (folder.read_state() or {})["urls"]["gateway"]
    session = requests.Session()

    def post(event: dict[str, str]) -> int:
        return session.post(f"{gateway}/v1/events", json=event, timeout=10).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(post, events))
    assert all(code < 300 for code in codes), sorted(set(codes))


def last_run(state: dict[str, Any]) -> dict[str, Any]:
    return ((state.get("training") or {}).get("status")) or {}


def test_too_few_interactions_are_gated_out_and_serving_is_untouched(system: RunFolder) -> None:
    send(system, views(system, TOO_FEW, seed=1))
    state = wait_for_state(
        system, lambda s: last_run(s).get("result") == "GatedOut", 120, "a gated-out run"
    )
    run = last_run(state)
    assert f"fewer than the {MIN_INTERACTIONS} needed" in run["reason"]
    assert run.get("archiveUri") is None and run["stableVersion"] == "1"
    assert state["rollout"]["canary"] is None and state["rollout"]["stableVersion"] == "1"
    assert state["desiredVersion"] == "1"
    assert not system.archive("smoke", run["candidateVersion"]).exists()
    assert any(e["reason"] == "TrainingGatedOut" for e in state["events"])


def test_enough_logged_events_publish_a_candidate_and_auto_rollout_canaries_it(
    system: RunFolder,
) -> None:
    send(system, views(system, ENOUGH, seed=2))
    state = wait_for_state(
        system, lambda s: last_run(s).get("result") == "Passed", 180, "a passing run"
    )
    run = last_run(state)
    candidate = run["candidateVersion"]
    assert run["candidateScore"] > run["stableScore"] * 1.05, run
    archive = system.archive("smoke", candidate)
    assert archive.is_file()
    assert run["archiveUri"] == f"file://{archive.resolve()}"
    state = wait_for_state(
        system,
        lambda s: ((s.get("rollout") or {}).get("canary") or {}).get("version") == candidate,
        180,
        f"a canary of candidate {candidate}",
    )
    assert state["rollout"]["stableVersion"] == "1"
    assert state["desiredVersion"] == candidate
    # GitOps: the desired state still says what the user wrote.
    assert read_manifest(system.manifest)["spec"]["model"]["version"] == "1"
    status = recsys("status", "--run-dir", str(system.root), cwd=Path(system.root).parent)
    assert f"last run Passed: candidate {candidate}" in status.stdout, status.stdout


def test_a_bad_retrain_interval_is_refused_before_anything_starts(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    folder = RunFolder(tmp_path / "run")
    result = recsys(
        "up", "-f", str(manifest), "--run-dir", str(folder.root), "--retrain-every", "soon",
        cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "--retrain-every 'soon'" in result.stderr
    assert not folder.state_file.exists()
