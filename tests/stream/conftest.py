"""Fixtures of the stream-job tests: URLs of the session's broker and Redis, fresh
names per test (topics, system ids), item embeddings on disk, and the settings of
a feature job for the test."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from stream_support import write_item_embeddings

from recsys_contracts.feature_job_settings import FeatureJobSettings
from recsys_operator.launchers.process import ManagedProcess
from recsys_operator.launchers.pulsar_broker import service_url
from recsys_operator.launchers.redis_server import redis_url


@pytest.fixture
def pulsar_url(pulsar_broker: ManagedProcess) -> str:
    return service_url(pulsar_broker)


@pytest.fixture
def restart_broker(pulsar_broker: ManagedProcess) -> Callable[[], None]:
    """Restart the session's broker in place (same port, same data): for a test that
    kill -9s a consumer. pulsar-lite 0.2.0 keeps a consumer whose connection ended in a
    reset (as a kill mid-stream often does) and never redelivers what it held unacked;
    only a restart frees it (docs/stream-features.md, known limits). Real Pulsar drops a
    dead connection's consumers and redelivers their messages: the restart stands in."""

    def restart() -> None:
        pulsar_broker.stop()
        pulsar_broker.start()

    return restart


@pytest.fixture
def store_url(redis_server: ManagedProcess) -> str:
    return redis_url(redis_server)


@pytest.fixture
def store(store_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(store_url)
    yield client
    client.close()


@pytest.fixture
def topic() -> str:
    """A topic no other test uses (pulsar-lite has no admin API to delete one)."""
    return f"persistent://public/default/interactions-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def system() -> str:
    """A system id of its own, so tests sharing the session's Redis never meet."""
    return f"test.s{uuid.uuid4().hex[:12]}"


@pytest.fixture
def embeddings_root(tmp_path: Path) -> Path:
    """Two model versions' item embeddings (items i0..i29), one sub-directory each."""
    root = tmp_path / "embeddings"
    items = [f"i{n}" for n in range(30)]
    write_item_embeddings(root / "v1", items, dim=8, seed=1)
    write_item_embeddings(root / "v2", items[:20], dim=4, seed=2)  # v2 lacks i20..i29
    return root


@pytest.fixture
def job_settings(
    pulsar_url: str, store_url: str, topic: str, system: str, embeddings_root: Path
) -> FeatureJobSettings:
    """Settings of a job in this test: Shared subscription (pulsar-lite), no /metrics port."""
    return FeatureJobSettings(
        system_id=system,
        pulsar_service_url=pulsar_url,
        interactions_topic=topic,
        subscription="features",
        subscription_type="Shared",
        redis_url=store_url,
        embeddings_path=embeddings_root,
        batch_size=100,
        batch_wait="10ms",
        max_future="3650d",  # the tests' events carry fixed past and future times
        max_past="3650d",
        rebuild_when_empty=False,  # tests that rebuild turn it on
        metrics_address=None,
        drain_timeout="5s",
    )
