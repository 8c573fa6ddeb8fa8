"""`recsys up --redis-cluster`: the supervisor's feature store as three Redis Cluster
primaries on loopback, each a part of its own that is restarted alone and rejoins."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from redis.cluster import RedisCluster

from recsys_operator.local.desired_state import localize
from recsys_operator.local.run_folder import RunFolder
from recsys_operator.local.supervisor import LocalSystem, Options

pytestmark = pytest.mark.redis


def test_the_local_store_can_be_a_three_primary_cluster(tmp_path: Path) -> None:
    system = LocalSystem(RunFolder(tmp_path / "run"), Options(redis_cluster=True))
    nodes = []
    try:
        url, mode = system._start_store()
        nodes = [system.parts.processes[f"redis-{n}"] for n in range(3)]
        assert mode == "cluster" and url.endswith(f":{nodes[0].port}/0")
        assert system._urls()["redis-cluster"] == url
        client = RedisCluster.from_url(url)
        assert len(client.get_primaries()) == 3
        client.set("{u1}:k", "v")

        nodes[1].kill()  # a node dies: restarted by itself, it rejoins from its nodes.conf
        system.parts.restart_failed(None, reroute=lambda: None)  # type: ignore[arg-type]
        assert nodes[1].alive()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if all(client.set(f"{{u{n}}}:k", "w") for n in range(20)):
                    break
            except Exception:  # slots of the restarted node, until the cluster heals
                time.sleep(0.2)
        assert client.get("{u7}:k") == b"w"
        client.close()
    finally:
        system.parts.stop()
    assert nodes and not any(node.alive() for node in nodes)


def test_a_localized_cluster_store_keeps_its_mode() -> None:
    body = {
        "apiVersion": "recsys.dev/v1alpha1",
        "kind": "RecommenderSystem",
        "metadata": {"name": "tiny"},
        "spec": {"model": {"version": "1"}},
    }
    local = localize(
        body, pulsar_url="pulsar://127.0.0.1:1", redis_url="redis://127.0.0.1:2/0",
        redis_mode="cluster",
    )  # fmt: skip
    store = local.spec.features.store
    assert (store.url, store.mode.value) == ("redis://127.0.0.1:2/0", "cluster")
