"""The event-log sink: the interactions (and impressions) topics in, Parquet files out.

    recsys event-log run --log-uri s3://bucket/log --interactions-topic ... --impressions-topic ...
    python -m stream_jobs.event_log_sink ...      (the same command, alone)

The loop:

1. receive a batch from both topics; a malformed event, or one from the future, is
   dead-lettered (published, then acked); a message may hold several events (the
   gateway batches its impressions: `recsys_contracts.event_wire`), valid as a whole
   (else the whole message is dead-lettered) and acked once every one of its events
   is written or dropped as a duplicate (`SharedMessage`);
2. drop events whose `event_id` was already written (a redelivery after a crash, a
   client's retry); buffer the rest; impressions wait in the join for their clicks
   (`impression_join`);
3. every `flush_interval` (or `flush_rows` events) write the buffered interactions and
   the impressions that fell due, one file per table and hour partition, durably
   (`event_log_store`), and only then acknowledge their messages;
4. every `compact_interval`, merge partitions that have `compact_min_files` files.

At least once, deduplicated: a crash between a write and its acks redelivers events
already written; at start the sink loads the ids (and clicks) of the files written in
the last `dedup_horizon`, so those come back as duplicates and are dropped. Compaction
and the readers drop any duplicate that got past this (ids resent after the horizon).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pulsar
import pyarrow as pa

from recsys_contracts import event_log_layout as layout
from recsys_contracts.event_log_settings import EventLogSettings
from recsys_contracts.event_wire import decode_records
from recsys_contracts.events import (
    Event,
    EventType,
    InvalidEvent,
    check_event_ts,
    now_ms,
)
from recsys_contracts.feature_job_settings import duration_ms
from stream_jobs.dead_letters import DeadLetter, DeadLetterPublisher
from stream_jobs.event_log_metrics import EventLogMetrics
from stream_jobs.event_log_store import EventLogStore, WrittenFile
from stream_jobs.impression_join import ImpressionJoin, PendingImpression, listed_items
from stream_jobs.subscription import subscribe_batches
from stream_jobs.until_signalled import DrainDeadline, run_until_signalled

log = logging.getLogger("stream_jobs.event_log_sink")

SUBSCRIBE_ATTEMPTS = 10
# Pulsar's default is 30 s; pulsar-lite can hold a killed consumer for a while, and shorter
# attempts let a restarted sink in sooner.
OPERATION_TIMEOUT_S = 10
SEEN_CAPACITY = 2_000_000  # event ids remembered (about 150 MB at most)
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
PAST_FOR_LOG_MS = 100 * 365 * 86_400_000  # the log keeps old events: only the future is refused


class SeenIds:
    """The event ids already written (or buffered), oldest forgotten first."""

    def __init__(self, capacity: int = SEEN_CAPACITY) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


@dataclass
class SharedMessage:
    """A message holding several events: acknowledged when the last of them is done."""

    message: Any
    left: int

    def settle_one(self) -> bool:
        """One of its events is done; True when that was the last (ack it now)."""
        self.left -= 1
        return self.left == 0


@dataclass
class Buffer:
    """Interactions received and not yet written, with their messages."""

    events: list[Event] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)
    since: float | None = None  # when the oldest arrived

    def add(self, event: Event, message: Any) -> None:
        if self.since is None:
            self.since = time.monotonic()
        self.events.append(event)
        self.messages.append(message)

    def __len__(self) -> int:
        return len(self.events)


class EventLogSink:
    """One consumer of the event topics that appends them to the offline log."""

    def __init__(
        self,
        settings: EventLogSettings,
        metrics: EventLogMetrics | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or EventLogMetrics(settings.system_id)
        self.store = EventLogStore(settings.log_uri, storage_options)
        self.join = ImpressionJoin(duration_ms(settings.click_window))
        # Ids written to the log, and ids received but not yet written: a copy of the
        # first kind is acked and dropped, a copy of the second dropped and acked once
        # the original is written (acking it now would ack a message before its event's
        # file exists; never acking it would leave it unacked for good). `in_flight`
        # maps each such id to the messages of its copies.
        self.seen = {layout.INTERACTIONS_TABLE: SeenIds(), layout.IMPRESSIONS_TABLE: SeenIds()}
        self.in_flight: dict[str, dict[str, list[Any]]] = {
            layout.INTERACTIONS_TABLE: {},
            layout.IMPRESSIONS_TABLE: {},
        }
        self.buffer = Buffer()
        self._flush_s = duration_ms(settings.flush_interval) / 1000
        self._compact_s = duration_ms(settings.compact_interval) / 1000
        self._drain = DrainDeadline(duration_ms(settings.drain_timeout) / 1000)
        # Dead letters the broker refused, their messages unacked, sent again when due.
        self._refused_letters: list[DeadLetter] = []
        self._letters_delay = BACKOFF_FIRST_S
        self._letters_retry_at = 0.0
        self._max_future_ms = duration_ms(settings.max_future)
        self._touched: set[tuple[str, tuple[str, str]]] = set()
        self._next_compaction = time.monotonic() + self._compact_s
        self._last_flush = time.monotonic()
        self._m = {"system": settings.system_id}

    # --- lifecycle ---------------------------------------------------------------

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        """Consume until `stop` is set, write what is due, and return."""
        s = self.settings
        self.load_recent()
        token = s.pulsar_token.get_secret_value() if s.pulsar_token else None
        client = pulsar.Client(
            s.pulsar_service_url,
            authentication=pulsar.AuthenticationToken(token) if token else None,
            logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn),
            operation_timeout_seconds=OPERATION_TIMEOUT_S,
        )
        endpoint = s.metrics_endpoint
        server = self.metrics.serve(*endpoint) if endpoint is not None else None
        try:
            consumer = self._subscribe(client)
            dead_letters = DeadLetterPublisher(
                client.create_producer(s.dead_letters, batching_enabled=False), s.subscription
            )
            log.info("logging %s to %s as %s", ", ".join(s.topics), s.log_uri, s.subscription)
            if ready is not None:
                ready.set()
            idle_s = duration_ms(s.resubscribe_idle) / 1000 if s.resubscribe_idle else None
            last_message = time.monotonic()
            while not stop.is_set():
                messages = consumer.batch_receive()
                now = time.monotonic()
                if messages:
                    last_message = now
                    self.receive(consumer, dead_letters, list(messages))
                elif idle_s and now - last_message >= idle_s and self._nothing_in_flight():
                    # Nothing unacked, so nothing is redelivered (see the setting).
                    consumer.close()
                    consumer = self._subscribe(client)
                    last_message = now
                if self._flush_due():
                    self.flush(consumer, stop)
                if self._refused_letters and time.monotonic() >= self._letters_retry_at:
                    self.retry_refused_letters(consumer, dead_letters)
                if time.monotonic() >= self._next_compaction:
                    self.compact_touched()
            log.info("stopping: writing what is buffered")
            self.flush(consumer, stop)
            self._dead_letter_until_drained(consumer, dead_letters, stop)
            consumer.close()
        finally:
            client.close()
            if server is not None:
                server.shutdown()

    def _nothing_in_flight(self) -> bool:
        return not self.buffer.events and self.join.pending == 0

    def _subscribe(self, client: pulsar.Client) -> pulsar.Consumer:
        s = self.settings
        return subscribe_batches(
            client,
            s.topics,
            s.subscription,
            s.subscription_type,
            batch_size=s.batch_size,
            batch_wait_ms=duration_ms(s.batch_wait),
            attempts=SUBSCRIBE_ATTEMPTS,
            max_delay_s=5.0,
        )

    def load_recent(self) -> None:
        """Remember the ids, clicks and newest time of the files written lately (see module)."""
        since = now_ms() - duration_ms(self.settings.dedup_horizon)
        for table in layout.TABLES:
            files = self.store.recent_files(table, since)
            if not files:
                continue
            columns = ["event_id", "ts"]
            if table == layout.INTERACTIONS_TABLE:
                columns += ["type", "request_id", "item_id"]
            rows = self.store.read_files(files, columns).to_pylist()
            for row in rows:
                self.seen[table].add(row["event_id"])
                self.join.observe(row["ts"])
                if row.get("type") == EventType.CLICK.value and row.get("request_id"):
                    self.join.add_click(
                        Event(
                            event_id=row["event_id"],
                            user_id="-",
                            item_id=row["item_id"],
                            type=EventType.CLICK,
                            ts=row["ts"],
                            request_id=row["request_id"],
                        )
                    )
            log.info("%s: %d ids from %d recent files", table, len(rows), len(files))

    # --- receiving -----------------------------------------------------------------

    def receive(
        self,
        consumer: Any,
        dead_letters: DeadLetterPublisher,
        messages: Sequence[Any],
    ) -> None:
        invalid: list[DeadLetter] = []
        now = now_ms()
        for message in messages:
            try:
                decoded = decode_records(message.data())
                for event, _ in decoded:
                    check_event_ts(event.ts, now, self._max_future_ms, PAST_FOR_LOG_MS)
            except InvalidEvent as problem:
                invalid.append(DeadLetter(message, problem))
                continue
            handle = message if len(decoded) == 1 else SharedMessage(message, len(decoded))
            for event, record in decoded:
                self._receive_one(consumer, event, record, handle)
        self.metrics.pending_impressions.labels(**self._m).set(self.join.pending)
        if invalid:
            self._dead_letter(consumer, dead_letters, invalid)

    def _dead_letter(
        self, consumer: Any, dead_letters: DeadLetterPublisher, letters: list[DeadLetter]
    ) -> None:
        """One try at `letters`, acking each message once its letter is stored. The
        refused ones stay unacked and are sent again from the loop, with backoff
        (`retry_refused_letters`): a dead-letter topic refusing for a while must not hold
        back the log's writes, and a message left unacked with a live consumer would come
        back only when that consumer goes."""
        refused = dead_letters.publish_once(
            letters, lambda letter: self._dead_lettered(consumer, letter)
        )
        if not refused:
            self._letters_delay = BACKOFF_FIRST_S
            return
        if not self._refused_letters:
            self._letters_retry_at = time.monotonic() + self._letters_delay
        self._refused_letters += refused
        log.warning(
            "the dead-letter topic refused %d messages; they stay unacked, retried in %.1fs",
            len(refused),
            self._letters_delay,
        )

    def retry_refused_letters(self, consumer: Any, dead_letters: DeadLetterPublisher) -> None:
        """Send the refused dead letters again (the loop calls it when they are due)."""
        letters, self._refused_letters = self._refused_letters, []
        self._letters_delay = min(2 * self._letters_delay, BACKOFF_MAX_S)
        self._dead_letter(consumer, dead_letters, letters)

    def _dead_letter_until_drained(
        self, consumer: Any, dead_letters: DeadLetterPublisher, stop: threading.Event
    ) -> None:
        """Stopping: the refused dead letters are sent again until `drain_timeout`."""
        if not self._refused_letters:
            return
        refused = dead_letters.publish_until_stored(
            self._refused_letters,
            lambda letter: self._dead_lettered(consumer, letter),
            give_up=lambda: self._drain.expired(stop),
            wait=lambda delay: self._drain.pause(stop, delay),
            backoff=(BACKOFF_FIRST_S, BACKOFF_MAX_S),
        )
        self._refused_letters = refused
        if refused:
            log.error("stopping while the dead-letter topic refuses: %d unacked", len(refused))

    def _dead_lettered(self, consumer: Any, letter: DeadLetter) -> None:
        consumer.acknowledge(letter.message)
        self.metrics.dead_letters.labels(**self._m, reason=letter.problem.code).inc()

    def _receive_one(
        self, consumer: Any, event: Event, record: dict[str, Any], handle: Any
    ) -> None:
        table = (
            layout.IMPRESSIONS_TABLE
            if event.type is EventType.IMPRESSION
            else layout.INTERACTIONS_TABLE
        )
        if event.event_id in self.seen[table]:
            self.metrics.duplicates.labels(**self._m, table=table, stage="sink").inc()
            self.settle(consumer, handle)
            return
        copies = self.in_flight[table].get(event.event_id)
        if copies is not None:
            self.metrics.duplicates.labels(**self._m, table=table, stage="sink").inc()
            copies.append(handle)  # settled with the original, once it is written
            return
        self.in_flight[table][event.event_id] = []
        self.join.observe(event.ts)
        if table == layout.IMPRESSIONS_TABLE:
            items = listed_items(event, record)
            self.join.add_impression(PendingImpression(event, items, handle))
        else:
            self.buffer.add(event, handle)
            self.join.add_click(event)

    def settle(self, consumer: Any, handle: Any) -> None:
        """One event of `handle` (a message, or a SharedMessage) is written or dropped:
        ack the message, or a shared one once all its events are."""
        if not isinstance(handle, SharedMessage):
            self.acknowledge(consumer, handle)
        elif handle.settle_one():
            self.acknowledge(consumer, handle.message)

    def _flush_due(self) -> bool:
        """A full buffer, or `flush_interval` since the oldest buffered event arrived or
        (for impressions that may have fallen due) since the last flush."""
        if len(self.buffer) >= self.settings.flush_rows:
            return True
        if self.join.pending > self.settings.max_pending_impressions:
            return True
        now = time.monotonic()
        if self.buffer.since is not None and now - self.buffer.since >= self._flush_s:
            return True
        return self.join.pending > 0 and now - self._last_flush >= self._flush_s

    # --- writing -----------------------------------------------------------------

    def flush(self, consumer: Any, stop: threading.Event) -> bool:
        """Write the buffer and the due impressions, then ack them; False if stopped first."""
        self._last_flush = time.monotonic()
        impressions = self.join.due(max_pending=self.settings.max_pending_impressions)
        impression_rows = [row for p in impressions for row in self.join.rows(p)]
        batches = [
            (layout.INTERACTIONS_TABLE, [e.model_dump(mode="json") for e in self.buffer.events]),
            (layout.IMPRESSIONS_TABLE, impression_rows),
        ]
        for table, rows in batches:
            for partition, part in _by_partition(rows).items():
                written = self._write_until_done(table, partition, part, stop)
                if written is None:
                    return False
                self._count(table, "batch", written)
                self.metrics.rows.labels(**self._m, table=table).inc(written.rows)
                self._touched.add((table, partition))
        copies: list[Any] = []  # messages of copies of the written events
        for table, written_ids in (
            (layout.INTERACTIONS_TABLE, [e.event_id for e in self.buffer.events]),
            (layout.IMPRESSIONS_TABLE, [p.event.event_id for p in impressions]),
        ):
            for event_id in written_ids:
                self.seen[table].add(event_id)
                copies += self.in_flight[table].pop(event_id, ())
        for message in self.buffer.messages:
            self.settle(consumer, message)
        for impression in impressions:
            self.settle(consumer, impression.message)
        for handle in copies:
            self.settle(consumer, handle)
        self.buffer = Buffer()
        self.metrics.pending_impressions.labels(**self._m).set(self.join.pending)
        return True

    def acknowledge(self, consumer: Any, message: Any) -> None:
        """Ack one written message (its own method: the crash tests leave it out)."""
        consumer.acknowledge(message)

    def _write_until_done(
        self,
        table: str,
        partition: tuple[str, str],
        rows: list[dict[str, Any]],
        stop: threading.Event,
    ) -> WrittenFile | None:
        """Write one file, retrying the store's errors with backoff (nothing is acked meanwhile)."""
        data = pa.Table.from_pylist(rows, schema=layout.schema(table))
        delay = BACKOFF_FIRST_S
        while True:
            try:
                return self.store.write(table, partition, data)
            except Exception as exc:  # fsspec backends raise their own families (OSError, botocore)
                self.metrics.write_errors.labels(**self._m, error=type(exc).__name__).inc()
                if self._drain.expired(stop):
                    log.error("stopping while the store fails (%s): events stay unacked", exc)
                    return None
                log.warning("writing to the log failed (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(2 * delay, BACKOFF_MAX_S)

    def _count(self, table: str, kind: str, written: WrittenFile) -> None:
        self.metrics.files.labels(**self._m, table=table, kind=kind).inc()
        self.metrics.bytes.labels(**self._m, table=table, kind=kind).inc(written.bytes)
        self.metrics.last_write.labels(**self._m).set_to_current_time()

    # --- compaction ----------------------------------------------------------------

    def compact_touched(self) -> None:
        """Merge the partitions this sink wrote to that have gathered enough files."""
        self._next_compaction = time.monotonic() + self._compact_s
        current = layout.partition_of(self.join.watermark_ms) if self.join.watermark_ms else None
        for table, partition in sorted(self._touched):
            try:
                files = self.store.partition_files(table, partition)
                if len(files) >= self.settings.compact_min_files:
                    result = self.store.compact(table, partition, files)
                    self._count(table, "compacted", result.written)
                    self.metrics.duplicates.labels(**self._m, table=table, stage="compaction").inc(
                        result.duplicates
                    )
                    log.info(
                        "compacted %s %s: %d files, %d rows, %d duplicates dropped",
                        table,
                        "/".join(partition),
                        result.files_in,
                        result.written.rows,
                        result.duplicates,
                    )
            except Exception as exc:  # another replica compacting the same partition, a store error
                log.warning("compacting %s %s failed (%s); retried later", table, partition, exc)
                continue
            if partition != current:
                self._touched.discard((table, partition))  # reopened when written again


def _by_partition(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    parts: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        parts[layout.partition_of(row["ts"])].append(row)
    return parts


def compact_log(
    uri: str, min_files: int = 2, storage_options: dict[str, Any] | None = None
) -> list[Any]:
    """Merge every partition of the log with `min_files` files or more (`recsys event-log
    compact`); returns the compactions done. FileNotFoundError when the root holds no
    table's folder: a mistyped root must not read as a log with nothing to merge."""
    store = EventLogStore(uri, storage_options)
    if not any(store.fs.exists(f"{store.root}/{table}") for table in layout.TABLES):
        folders = " or ".join(f"{table}/" for table in layout.TABLES)
        raise FileNotFoundError(f"no event log at {uri} (no {folders} folder)")
    done = []
    for table in layout.TABLES:
        by_partition: dict[tuple[str, str], list[str]] = defaultdict(list)
        for path in store.files(table):
            date = path.split(f"/{layout.DATE_KEY}=", 1)[1].split("/", 1)[0]
            hour = path.split(f"/{layout.HOUR_KEY}=", 1)[1].split("/", 1)[0]
            by_partition[(date, hour)].append(path)
        for partition, files in sorted(by_partition.items()):
            if len(files) >= min_files:
                done.append(store.compact(table, partition, files))
    return done


def main(settings: EventLogSettings) -> int:
    """Run the job in this process until SIGTERM or SIGINT; the exit code."""
    return run_until_signalled(EventLogSink(settings).run)


if __name__ == "__main__":
    from stream_jobs.cli import event_log_main

    event_log_main()
