"""The stream feature job: interaction events in, fresh per-user features out.

    recsys features run --system-id NS.NAME --interactions-topic ... --redis-url ...
    python -m stream_jobs.features ...      (the same command, alone)

The loop, one batch at a time:

1. receive up to `batch_size` messages, waiting at most `batch_wait`;
2. parse each; a malformed one becomes a dead letter (published, then acked);
3. apply the valid ones per user and write them to Redis atomically
   (`feature_store`); on a Redis error, back off and retry the same batch
   (nothing is acked meanwhile, so nothing is lost);
4. ack the batch only after the write committed.

Delivery is at least once; the state remembers event ids, so a redelivered
event changes nothing. SIGTERM finishes the batch in hand (for up to
`drain_timeout`), then exits; unacked messages go to another consumer.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pulsar
import redis

from recsys_contracts.event_wire import decode_event
from recsys_contracts.events import Event, EventType, InvalidEvent, check_event_time, now_ms
from recsys_contracts.feature_job_settings import FeatureJobSettings, duration_ms
from stream_jobs.backlog import BacklogPoller
from stream_jobs.dead_letters import DeadLetter, DeadLetterPublisher
from stream_jobs.feature_store import (
    BatchWrite,
    FeatureStore,
    StoreClient,
    StoreLayout,
    TooManyConflicts,
)
from stream_jobs.item_embeddings import EmbeddingCatalog, EmbeddingsError
from stream_jobs.metrics import FeatureJobMetrics, observe_all
from stream_jobs.rebuild import rebuild, rebuild_unfinished, store_is_empty
from stream_jobs.subscription import subscribe_batches
from stream_jobs.until_signalled import DrainDeadline, run_until_signalled
from stream_jobs.user_features import FeatureParams, Outcome

log = logging.getLogger("stream_jobs.features")

SUBSCRIBE_ATTEMPTS = 5

# Redis errors worth waiting out: the server is down, restarting, loading or unreachable;
# at its maxmemory (noeviction: writes are refused until keys expire or it gets more
# memory); a replica now (READONLY: after a failover the address reaches the new primary
# once the store's connections, dropped on the error, connect again); in a cluster also
# a cluster without a primary for some slot, or slots moving.
STORE_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    TooManyConflicts,
)
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
GC_ALLOCATIONS = 50_000
"""Allocations between two collections of the youngest generation, in a job process."""
# An event naming a model version we have not loaded triggers a rescan, at most this often.
UNKNOWN_VERSION_RESCAN_S = 5.0


def pulsar_client(settings: FeatureJobSettings) -> pulsar.Client:
    token = settings.pulsar_token.get_secret_value() if settings.pulsar_token else None
    return pulsar.Client(
        settings.pulsar_service_url,
        authentication=pulsar.AuthenticationToken(token) if token else None,
        logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn),  # its INFO lines are per connection
    )


def store_persistence(client: StoreClient) -> bool | None:
    """True when Redis writes an append-only file or snapshots, False when neither, None
    when it cannot tell (CONFIG refused, as managed Redis services often do, or down)."""
    try:
        appendonly = client.config_get("appendonly").get("appendonly")
        save = client.config_get("save").get("save")
    except redis.RedisError:
        return None
    return appendonly == "yes" or bool((save or "").strip())


def redis_client(settings: FeatureJobSettings) -> StoreClient:
    """A `redis.Redis`, or a `redis.cluster.RedisCluster` for a cluster store."""
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    return settings.store_endpoint.connect(
        password=password, socket_timeout=5, socket_connect_timeout=2
    )


class FeatureJob:
    """One consumer of the interactions topic that keeps the users' features fresh."""

    def __init__(
        self,
        settings: FeatureJobSettings,
        metrics: FeatureJobMetrics | None = None,
        store_client: StoreClient | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or FeatureJobMetrics()
        self.params = FeatureParams.from_settings(settings)
        layout = StoreLayout(
            system=settings.system_id,
            ttl_ms=settings.store_ttl_seconds * 1000,
            popular_half_life_ms=duration_ms(settings.popular_half_life),
        )
        self.store = FeatureStore(store_client or redis_client(settings), layout, self.params)
        self.catalog = EmbeddingCatalog(
            settings.embeddings_path,
            settings.model_version,
            settings.model_archive_uri,
            settings.model_archives,
        )
        self._max_future_ms = duration_ms(settings.max_future)
        self._max_past_ms = duration_ms(settings.max_past)
        self._drain = DrainDeadline(duration_ms(settings.drain_timeout) / 1000)
        self._reload_s = duration_ms(settings.embeddings_reload) / 1000
        idle = settings.resubscribe_idle
        self._resubscribe_s = duration_ms(idle) / 1000 if idle else None
        self._next_reload = 0.0
        self._last_unknown_rescan = 0.0

    # --- lifecycle ---------------------------------------------------------------

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        """Consume until `stop` is set, then finish the batch in hand and return."""
        s = self.settings
        client = pulsar_client(s)
        endpoint = s.metrics_endpoint
        server = self.metrics.serve(*endpoint) if endpoint is not None else None
        poller = self._start_backlog_poller()
        try:
            dead_letters = DeadLetterPublisher(
                client.create_producer(s.dead_letters, batching_enabled=False), s.subscription
            )
            self._refresh_embeddings()
            self._check_store_persistence()
            self._rebuild_if_empty(client, stop)
            if stop.is_set():
                return  # stopped before or during the rebuild: nothing consumed yet
            # Subscribed only after the rebuild: a consumer that exists during it is sent a
            # receive queue of messages it does not read, which no other consumer of a Shared
            # subscription gets meanwhile, and which a job killed mid-rebuild leaves with its
            # dead consumer (pulsar-lite then never redelivers them). Nothing is missed: the
            # subscription starts at the earliest message when new, and keeps its cursor if not.
            consumer = self._subscribe(client)
            log.info(
                "consuming %s as %s (%s)", s.interactions_topic, s.subscription, s.subscription_type
            )
            if ready is not None:
                ready.set()
            last_message = time.monotonic()
            while not stop.is_set():
                messages = consumer.batch_receive()
                now = time.monotonic()
                if now >= self._next_reload:
                    self._refresh_embeddings()
                if messages:
                    last_message = now
                    self.process_batch(consumer, dead_letters, list(messages), stop)
                elif self._resubscribe_s and now - last_message >= self._resubscribe_s:
                    # Nothing is in flight when idle, so nothing is redelivered.
                    consumer.close()
                    consumer = self._subscribe(client)
                    last_message = now
                    self.metrics.resubscribes.inc()
            log.info("stopping: the batch in hand is done")
            consumer.close()
        finally:
            if poller is not None:
                poller.stop()
            client.close()
            if server is not None:
                server.shutdown()

    def _check_store_persistence(self) -> None:
        """Say at start whether Redis keeps what the job writes across its restarts."""
        persistent = store_persistence(self.store.client)
        self.metrics.store_persistent.set(-1 if persistent is None else int(persistent))
        if persistent is False:
            log.warning(
                "the feature store persists nothing (appendonly no, no save points): a Redis "
                "restart loses every user's state until `recsys features rebuild` runs"
            )

    def _rebuild_if_empty(self, client: pulsar.Client, stop: threading.Event) -> None:
        if not self.settings.rebuild_when_empty:
            return
        delay = BACKOFF_FIRST_S
        while not stop.is_set():
            try:
                system = self.settings.system_id
                if not store_is_empty(self.store.client, system):
                    if not rebuild_unfinished(self.store.client, system):
                        return
                    log.warning("a rebuild of the feature store never ended: rebuilding again")
                else:
                    log.warning("the feature store is empty: rebuilding it from the topic")
                items = self.catalog.versions if self.settings.online_updates else {}
                report = rebuild(self.settings, client, self.store, items, stop)
                if report.stopped:
                    log.warning(
                        "stopped during the rebuild (%s): the next start rebuilds again",
                        report.summary(),
                    )
                else:
                    log.warning("rebuilt the feature store: %s", report.summary())
                return
            except STORE_ERRORS as exc:
                log.warning("feature store unavailable for the rebuild check (%s)", exc)
                stop.wait(delay)
                delay = min(2 * delay, BACKOFF_MAX_S)

    def _subscribe(self, client: pulsar.Client) -> pulsar.Consumer:
        s = self.settings
        return subscribe_batches(
            client,
            s.interactions_topic,
            s.subscription,
            s.subscription_type,
            batch_size=s.batch_size,
            batch_wait_ms=duration_ms(s.batch_wait),
            attempts=SUBSCRIBE_ATTEMPTS,
            max_delay_s=10.0,
        )

    def _start_backlog_poller(self) -> BacklogPoller | None:
        s = self.settings
        if not s.pulsar_admin_url:
            return None
        topic = s.interactions_topic
        gauge = self.metrics.backlog.labels(topic=topic, subscription=s.subscription)
        token = s.pulsar_token.get_secret_value() if s.pulsar_token else None
        return BacklogPoller(s.pulsar_admin_url, topic, s.subscription, token, gauge.set).start()

    def _refresh_embeddings(self) -> None:
        self._next_reload = time.monotonic() + self._reload_s
        if not self.settings.online_updates:
            return
        try:
            self.catalog.refresh()
        except EmbeddingsError as exc:
            log.error("%s", exc)
        self.metrics.item_embeddings.clear()
        for version, items in self.catalog.versions.items():
            self.metrics.item_embeddings.labels(model_version=version).set(len(items.item_ids))

    # --- one batch ---------------------------------------------------------------

    def process_batch(
        self,
        consumer: pulsar.Consumer,
        dead_letters: DeadLetterPublisher,
        messages: Sequence[Any],
        stop: threading.Event,
    ) -> bool:
        """Apply, write, dead-letter and ack one batch; False when some of it was left
        unacked (stopping)."""
        started = time.monotonic()
        valid, invalid = self._parse(messages)
        if valid:
            self._maybe_rescan_for([event for _, event in valid])
            written = self._write_until_done([event for _, event in valid], stop)
            if written is None:
                return False
            self._record(written)
            for message, event, outcome in self._outcomes(valid, written):
                if outcome is Outcome.LATE:
                    invalid.append(DeadLetter(message, _too_late(self.settings.allowed_lateness)))
                elif outcome is Outcome.UNREADABLE_STATE:
                    problem = written.updates[event.user_id].problem or "unreadable state"
                    invalid.append(DeadLetter(message, InvalidEvent(outcome.value, problem)))
                else:
                    consumer.acknowledge(message)
        if invalid and not self._dead_letter_until_done(consumer, dead_letters, invalid, stop):
            return False
        self.metrics.batch_events.observe(len(messages))
        self.metrics.batch_seconds.observe(time.monotonic() - started)
        self.metrics.last_batch.set_to_current_time()
        return True

    def _dead_letter_until_done(
        self,
        consumer: pulsar.Consumer,
        dead_letters: DeadLetterPublisher,
        letters: list[DeadLetter],
        stop: threading.Event,
    ) -> bool:
        """Dead-letter `letters`, acking each message once its letter is stored; the
        refused ones are sent again (`publish_until_stored`), on SIGTERM until
        `drain_timeout`. False if stopped before all were stored."""

        def stored(letter: DeadLetter) -> None:
            consumer.acknowledge(letter.message)
            self.metrics.dead_letters.labels(reason=letter.problem.code).inc()

        refused = dead_letters.publish_until_stored(
            letters,
            stored,
            give_up=lambda: self._drain.expired(stop),
            wait=lambda delay: self._drain.pause(stop, delay),
            backoff=(BACKOFF_FIRST_S, BACKOFF_MAX_S),
        )
        if refused:
            log.error(
                "stopping while the dead-letter topic refuses messages: %d left unacked",
                len(refused),
            )
        return not refused

    @staticmethod
    def _outcomes(
        valid: list[tuple[Any, Event]], written: BatchWrite
    ) -> list[tuple[Any, Event, Outcome]]:
        """Each valid message and its event with what the event did (per user, in
        arrival order)."""
        outcomes = {user: iter(update.outcomes) for user, update in written.updates.items()}
        return [(message, event, next(outcomes[event.user_id])) for message, event in valid]

    def _parse(self, messages: Sequence[Any]) -> tuple[list[tuple[Any, Event]], list[DeadLetter]]:
        valid, invalid = [], []
        now = now_ms()
        for message in messages:
            try:
                event = decode_event(message.data())
                check_event_time(event, now, self._max_future_ms, self._max_past_ms)
            except InvalidEvent as problem:
                invalid.append(DeadLetter(message, problem))
            else:
                valid.append((message, event))
        return valid, invalid

    def _maybe_rescan_for(self, events: list[Event]) -> None:
        """Reload embeddings early when events name a model version not loaded yet."""
        if not self.settings.online_updates or not self.catalog.has_sources:
            return
        named = {e.model_version for e in events if e.model_version}
        if named - set(self.catalog.versions):
            now = time.monotonic()
            if now - self._last_unknown_rescan >= UNKNOWN_VERSION_RESCAN_S:
                self._last_unknown_rescan = now
                self._refresh_embeddings()

    def _write_until_done(self, events: list[Event], stop: threading.Event) -> BatchWrite | None:
        """Write the batch, retrying Redis errors with backoff; None if stopped before it could."""
        by_user: dict[str, list[Event]] = {}
        for event in events:
            by_user.setdefault(event.user_id, []).append(event)
        items = self.catalog.versions if self.settings.online_updates else {}
        delay = BACKOFF_FIRST_S
        while True:
            try:
                return self.store.apply(by_user, items)
            except STORE_ERRORS as exc:
                self.metrics.store_errors.labels(error=type(exc).__name__).inc()
                if self._drain.expired(stop):
                    log.error(
                        "stopping while the store fails (%s): %d events left unacked",
                        exc,
                        len(events),
                    )
                    return None
                log.warning("feature store write failed (%s); retrying in %.2fs", exc, delay)
                self._drain.pause(stop, delay)
                delay = min(2 * delay, BACKOFF_MAX_S)

    def _record(self, written: BatchWrite) -> None:
        pairs: list[tuple[EventType, Outcome]] = []
        ages_ms: list[float] = []
        unknown: Counter[str] = Counter()
        written_at_ms = written.written_at_ms
        applied = Outcome.APPLIED
        for user, update in written.updates.items():
            if update.unknown_items:
                unknown.update(update.unknown_items)
            events, outcomes = written.events[user], update.outcomes
            pairs += zip([event.type for event in events], outcomes, strict=True)
            ages_ms += [
                written_at_ms - event.ts
                for event, outcome in zip(events, outcomes, strict=True)
                if outcome is applied
            ]
        observe_all(self.metrics.freshness, [max(0.0, age_ms / 1000) for age_ms in ages_ms])
        for (event_type, result), n in Counter(pairs).items():
            self.metrics.events.labels(type=event_type.value, outcome=result.value).inc(n)
        for version, n in unknown.items():
            self.metrics.unknown_items.labels(model_version=version).inc(n)


def _too_late(allowed_lateness: str) -> InvalidEvent:
    return InvalidEvent(
        "late",
        f"ts: more than {allowed_lateness} (allowed_lateness) behind the user's newest event",
    )


def main(settings: FeatureJobSettings) -> int:
    """Run the job in this process until SIGTERM or SIGINT; the exit code."""
    # A batch allocates many short-lived objects; with CPython's default thresholds (a
    # collection every 700 allocations) the collector cost 10-20 us of CPU an event here
    # (benchmarks/README.md, stream_features.py).
    gc.set_threshold(GC_ALLOCATIONS, 20, 20)
    return run_until_signalled(FeatureJob(settings).run)


if __name__ == "__main__":
    from stream_jobs.cli import features_main

    features_main()
