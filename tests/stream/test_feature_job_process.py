"""The feature job as its own process (`python -m stream_jobs.features`): killed
mid-stream, stopped with SIGTERM, configured from the environment, scraped."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from stream_support import (
    StoreContent,
    applied_events,
    expected_content,
    interleave_users,
    known_stream,
    produce_events,
    running_job,
    store_content,
    wait_until,
)

from recsys_contracts import feature_keys as keys
from recsys_contracts.events import Event
from recsys_contracts.feature_job_settings import FeatureJobSettings, duration_ms
from recsys_operator.launchers.process import ManagedProcess, free_port, log_tail
from stream_jobs.item_embeddings import EmbeddingCatalog
from stream_jobs.user_features import FeatureParams

pytestmark = [pytest.mark.broker, pytest.mark.redis]


def job_process(settings: FeatureJobSettings, log: Path) -> ManagedProcess:
    """The job as a child process: some settings from the environment, some as flags."""
    port = free_port()
    env = {
        "RECSYS_SYSTEM_ID": settings.system_id,
        "RECSYS_PULSAR_SERVICE_URL": settings.pulsar_service_url,
        "RECSYS_REDIS_URL": settings.redis_url,
        "RECSYS_WINDOWS": ",".join(settings.windows),
        "RECSYS_MAX_FUTURE": settings.max_future,
        "RECSYS_MAX_PAST": settings.max_past,
    }
    argv = [
        sys.executable, "-m", "stream_jobs.features",
        "--interactions-topic", settings.interactions_topic,
        "--subscription", settings.subscription,
        "--subscription-type", settings.subscription_type.value,
        "--embeddings-path", str(settings.embeddings_path),
        "--batch-size", str(settings.batch_size),
        "--batch-wait", settings.batch_wait,
        "--metrics-address", f"127.0.0.1:{port}",
    ]  # fmt: skip
    return ManagedProcess("feature-job", argv, log, port, env=env)


def reference(settings: FeatureJobSettings, events: list[Event]) -> StoreContent:
    catalog = EmbeddingCatalog(settings.embeddings_path)
    catalog.refresh()
    half_life = duration_ms(settings.popular_half_life)
    return expected_content(
        settings.system_id, events, FeatureParams.from_settings(settings), catalog, half_life
    )


def send_paced(url: str, topic: str, events: list[Event], per_second: int) -> threading.Thread:
    """Produce `events` in slices over time from a thread, so a job meets them live."""

    def run() -> None:
        step = max(1, per_second // 20)
        for start in range(0, len(events), step):
            produce_events(url, topic, events[start : start + step])
            time.sleep(0.05)

    thread = threading.Thread(target=run, name="paced-producer", daemon=True)
    thread.start()
    return thread


def test_a_job_killed_mid_stream_and_restarted_ends_where_an_uninterrupted_run_does(
    job_settings: FeatureJobSettings,
    store: redis.Redis,
    pulsar_url: str,
    topic: str,
    tmp_path: Path,
    restart_broker: Callable[[], None],
) -> None:
    # resubscribe_idle as local mode sets it (a pulsar-lite quirk with batches, see the docs)
    settings = job_settings.model_copy(update={"batch_size": 20, "resubscribe_idle": "5s"})
    events = interleave_users(known_stream(users=30, per_user=40, seed=17))
    users = sorted({e.user_id for e in events})
    producer = send_paced(pulsar_url, topic, events, per_second=600)  # about two seconds

    job = job_process(settings, tmp_path / "job.log").start()
    try:
        wait_until(lambda: applied_events(store, settings.system_id, users) >= 200, 30, "progress")
        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{job.port}/metrics", timeout=5)
            .read()
            .decode()
        )
        assert job.popen is not None
        os.kill(job.popen.pid, signal.SIGKILL)  # our own child, by its PID
        assert job.popen.wait(timeout=10) == -signal.SIGKILL
        assert applied_events(store, settings.system_id, users) < len(events), (
            "killed after the end"
        )
        for name in ("recsys_feature_events_total", "recsys_feature_freshness_seconds_bucket",
                     "recsys_feature_batch_seconds_bucket", "recsys_feature_item_embeddings"):  # fmt: skip
            assert name in metrics

        producer.join(30)
        restart_broker()  # frees the killed consumer and what it held (see the fixture)
        job = job_process(settings, tmp_path / "job-restarted.log").start()
        expected = reference(settings, events)
        wait_until(
            lambda: store_content(store, settings.system_id, users, ["v1", "v2"]).same_as(expected),
            150,  # a loaded machine
            "the restarted job to finish the stream",
        )
    except AssertionError:
        print(log_tail(tmp_path / "job.log"), log_tail(tmp_path / "job-restarted.log"), sep="\n")
        raise
    finally:
        job.stop()

    # the same stream through a job that was never interrupted, into another system's keys
    uninterrupted = settings.model_copy(
        update={"system_id": settings.system_id + "-u", "subscription": "uninterrupted"}
    )
    with running_job(uninterrupted):
        wait_until(
            lambda: applied_events(store, uninterrupted.system_id, users) == len(events),
            60,
            "the other run",
        )
    killed = store_content(store, settings.system_id, users, ["v1", "v2"])
    clean = store_content(store, uninterrupted.system_id, users, ["v1", "v2"])
    assert killed.same_as(clean)


def test_sigterm_finishes_the_batch_in_hand_and_exits_cleanly(
    job_settings: FeatureJobSettings,
    store: redis.Redis,
    pulsar_url: str,
    topic: str,
    tmp_path: Path,
) -> None:
    settings = job_settings.model_copy(update={"batch_size": 10})
    events = interleave_users(known_stream(users=10, per_user=30, seed=19))
    users = sorted({e.user_id for e in events})
    producer = send_paced(pulsar_url, topic, events, per_second=400)
    job = job_process(settings, tmp_path / "job.log").start()
    try:
        # Consuming (an empty store is first rebuilt from the topic: stopped there, the job
        # exits at the next message, the test below) and past its first batches.
        wait_until(lambda: "consuming " in log_tail(tmp_path / "job.log"), 30, "consuming")
        wait_until(lambda: applied_events(store, settings.system_id, users) >= 20, 30, "progress")
        assert job.popen is not None
        job.popen.send_signal(signal.SIGTERM)
        assert job.popen.wait(timeout=20) == 0
        assert "stopping: the batch in hand is done" in log_tail(tmp_path / "job.log")
    finally:
        job.stop()
    producer.join(30)
    # whatever the stopped job acked is in the store; the rest comes to the next consumer
    with running_job(settings):
        expected = reference(settings, events)
        wait_until(
            lambda: store_content(store, settings.system_id, users, ["v1", "v2"]).same_as(expected),
            60,
            "the rest of the stream",
        )


@dataclass
class StoreLost:
    """A store that held every event of a stream, then lost its data (Redis restarted
    empty) while the subscription's cursor is past every event: only a rebuild from the
    topic brings the users back."""

    store: redis.Redis
    system: str
    users: list[str]
    expected: StoreContent
    full: int
    """Events applied in the store before it was lost."""

    @classmethod
    def after_the_stream(
        cls,
        settings: FeatureJobSettings,
        store: redis.Redis,
        pulsar_url: str,
        topic: str,
        events: list[Event],
        timeout: float,
    ) -> StoreLost:
        users = sorted({e.user_id for e in events})
        lost = cls(store, settings.system_id, users, reference(settings, events), 0)
        produce_events(pulsar_url, topic, events)
        with running_job(settings):  # every event applied and acked
            wait_until(lost.rebuilt, timeout, "the stream")
        lost.full = lost.applied()
        for key in list(store.scan_iter(match=f"recsys:v2:{settings.system_id}:*")):
            store.delete(key)  # Redis lost its data
        return lost

    def rebuilt(self) -> bool:
        content = store_content(self.store, self.system, self.users, ["v1", "v2"])
        return bool(content.same_as(self.expected))

    def applied(self) -> int:
        return applied_events(self.store, self.system, self.users)

    def wait_for_a_rebuilt_batch(self) -> None:
        wait_until(lambda: self.applied() > 0, 60, "a rebuilt batch")


def test_a_job_stopped_during_a_rebuild_exits_at_once_and_the_next_start_finishes_it(
    job_settings: FeatureJobSettings,
    store: redis.Redis,
    pulsar_url: str,
    topic: str,
    tmp_path: Path,
) -> None:
    """SIGTERM during a rebuild (a rolling update, a node drained): the job stops at the
    next message, within its grace period, not at the end of the topic; the store stays
    marked, so the next start rebuilds again and nothing stays missing."""
    settings = job_settings.model_copy(update={"batch_size": 100})
    events = interleave_users(known_stream(users=40, per_user=250, seed=37))  # 100 batches
    lost = StoreLost.after_the_stream(settings, store, pulsar_url, topic, events, timeout=120)

    job = job_process(settings, tmp_path / "job.log").start()
    try:
        lost.wait_for_a_rebuilt_batch()
        assert job.popen is not None
        os.kill(job.popen.pid, signal.SIGTERM)  # our own child, by its PID
        started = time.monotonic()
        assert job.popen.wait(timeout=20) == 0, log_tail(tmp_path / "job.log")
        stopped_in = time.monotonic() - started
    finally:
        job.stop()
    assert lost.applied() < lost.full, "stopped after the rebuild"
    assert store.exists(keys.rebuild_marker_key(settings.system_id))
    assert stopped_in < 10

    with running_job(settings.model_copy(update={"rebuild_when_empty": True})):
        wait_until(lost.rebuilt, 120, "the next start to finish the rebuild")


def test_a_rebuild_killed_midway_is_done_again_at_the_next_start(
    job_settings: FeatureJobSettings,
    store: redis.Redis,
    pulsar_url: str,
    topic: str,
    tmp_path: Path,
    restart_broker: Callable[[], None],
) -> None:
    """Redis lost its data while the subscription's cursor is past every event: only a
    rebuild from the topic brings the users back. A job killed during that rebuild (a
    node drained, an OOM kill) leaves some of them; then the store is no longer empty, so
    the next start did not rebuild, and the others stayed missing for good."""
    settings = job_settings.model_copy(update={"batch_size": 100})
    events = interleave_users(known_stream(users=10, per_user=25, seed=31))  # 2.5 batches
    lost = StoreLost.after_the_stream(settings, store, pulsar_url, topic, events, timeout=60)

    job = job_process(settings, tmp_path / "job.log").start()  # rebuild_when_empty: default
    try:
        lost.wait_for_a_rebuilt_batch()
        assert job.popen is not None
        os.kill(job.popen.pid, signal.SIGKILL)  # our own child, by its PID
        job.popen.wait(timeout=10)
    finally:
        job.stop()
    assert lost.applied() < lost.full, "killed after the rebuild"
    restart_broker()  # frees what the killed job held (see the fixture)

    with running_job(settings.model_copy(update={"rebuild_when_empty": True})):
        wait_until(lost.rebuilt, 60, "the next start to finish the rebuild")
