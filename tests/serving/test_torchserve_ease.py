"""The default model (recency-weighted EASE) through the whole path: trained on a CSV
with string ids, archived, and served by a real TorchServe with the same handler.
Its answers must be the trainer's own ranking: the serving contract (user query +
inner-product index) holds for it without a re-ranking stage."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from model_handlers.archive import ArchiveRequest, build_archive
from model_handlers.evaluation import top_k_unseen
from model_handlers.interaction_files import load_interactions
from model_handlers.model_directory import write_trained_model
from model_handlers.training import TrainedModel, TrainingConfig, train_model
from recsys_operator.api.recommender_system import IndexSpec, ModelSpec, ServingSpec
from recsys_operator.launchers.torchserve import LocalTorchServe, torchserve_server

pytestmark = [pytest.mark.java, pytest.mark.xdist_group("torchserve")]

NAME = "ease-retrieval"
RANK = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainedModel, Path]:
    root = tmp_path_factory.mktemp("ease")
    rng = np.random.default_rng(0)
    # Users with tastes in one of four item groups; ids with characters a URL would escape.
    lines = ["user,item,ts"]
    for n in range(6000):
        user = int(rng.integers(200))
        item = (
            int((user % 4) * 40 + rng.integers(40))
            if rng.random() < 0.8
            else int(rng.integers(160))
        )
        lines.append(f"cust #{user},sku/{item} ä,{1_700_000_000 + n * 60}")
    path = root / "log.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    from model_handlers.interaction_files import Columns

    log = load_interactions(path, Columns(user="user", item="item", time="ts"))
    config = TrainingConfig(ease=replace(TrainingConfig().ease, rank=RANK))
    model = train_model(log, config)
    write_trained_model(model, root / "model")
    build_archive(
        ArchiveRequest(
            model_dir=root / "model",
            out_dir=root / "store",
            name=NAME,
            version="1",
            index=IndexSpec(type="Flat"),
            top_k=20,
        )
    )
    return model, root


@pytest.fixture(scope="module")
def server(
    trained: tuple[TrainedModel, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalTorchServe]:
    _, root = trained
    ts = torchserve_server(
        tmp_path_factory.mktemp("torchserve-ease"),
        model=ModelSpec(name=NAME, version="1", embedding_dim=RANK, top_k=20),
        serving=ServingSpec(
            workers=1, responseTimeoutS=20, resources={"limits": {"memory": "2Gi"}}
        ),
        model_store=root / "store",
    )
    ts.start(timeout=180)
    yield ts
    ts.stop()


def _post(server: LocalTorchServe, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        server.predictions_url("1"),
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, object] = json.loads(response.read())
        return answer


def test_served_answers_are_the_trainers_ranking(
    server: LocalTorchServe, trained: tuple[TrainedModel, Path]
) -> None:
    model, _ = trained
    log = model.interactions
    position = {item: n for n, item in enumerate(log.item_ids)}
    scorer = model.scorer()
    for user in (3, 77, 150):
        rows = np.flatnonzero(log.user == user)[-5:]  # the log is sorted by time
        recent = [log.item_ids[i] for i in log.item[rows].tolist()]
        recent_rows = [position[i] for i in recent]  # oldest first
        expected = top_k_unseen(
            scorer(np.array([user]), [np.array(recent_rows)]), [np.array(recent_rows)], 10
        )[0]
        body = _post(
            server, {"user_id": log.user_ids[user], "k": 10, "recent_item_ids": recent[::-1]}
        )
        assert body["item_ids"] == [log.item_ids[i] for i in expected]
        # The users' own group comes first: the model learned something.
        group = int(log.user_ids[user].split("#")[1]) % 4
        mine = sum(int(i.split("/")[1].split()[0]) // 40 == group for i in body["item_ids"])  # type: ignore[union-attr]
        assert mine >= 7
