"""Events to Pulsar without ever slowing a response down.

Request handlers call `EventSink.publish`, which only puts the encoded event into a
bounded in-memory buffer and returns. One background thread takes events from the
buffer and hands them to the Pulsar client's asynchronous, batching producer; the
client's own threads report each send's outcome. The event loop never waits for
Pulsar, so a slow or absent broker costs events, never latency or availability.

Impressions (one per recommendation: the bulk of the traffic) go several to a
message, as an event batch (`recsys_contracts.event_wire.encode_batch`): everything
the sender took from the buffer at once, per topic, up to `MAX_BATCH_EVENTS`. Per
message the Pulsar client costs a send call and a callback on its own thread that
has to take the GIL from the event loop; per batch instead of per event, that
hand-over stops being most of what an impression costs. A batch carries no partition
key (its events are several users'): the impressions' one consumer, the event-log
sink, joins by request id and needs no per-user order. Interactions, which the
feature job applies in each user's order, still go one to a message, keyed by user.

Every accepted event is accounted for: it is sent (`recsys_gateway_events_sent_total`),
counted as dropped, exactly one count per event
(`recsys_gateway_events_dropped_total{reason}`), or spilled to a file at shutdown and
sent again by the next gateway that starts with the same file
(`recsys_gateway_events_spilled_total`, `..._restored_total`). That gateway moves the
file aside (`<file>.restoring`) and deletes it only once each event it read is sent,
dropped or spilled again, so a gateway killed before that leaves them to the next.
`recsys_gateway_events_buffered` counts the events the broker has not acknowledged yet
(in the buffer, in the sender's hands or sent and unconfirmed): growing, it says the
broker is not taking events.

- `buffer_full`        the buffer is full (the broker is down or slower than traffic);
- `send_failed`        the broker refused a send `max_attempts` times (not a timeout);
- `not_configured`     the routing names no Pulsar service URL or topic;
- `invalid_event`      the event contract refuses it (e.g. a model returned an item id
                       with spaces);
- `shutdown`           still buffered or unacknowledged when the gateway stopped (after
                       a bounded drain), and there is no spill file to keep it in (or
                       its line there was cut short: a gateway killed while spilling).

While the broker is unreachable (no producer, or sends time out after
`SEND_TIMEOUT_MS`) the event in hand is retried without limit and the buffer absorbs
the rest, so an outage shorter than the buffer loses nothing. A failed send is retried
by putting the event back into the buffer, so retries never block the sender thread.
Pulsar is at-least-once anyway: consumers dedupe by `event_id`, which a retry and a
spill keep (an event unacknowledged at shutdown is spilled even if the broker did
store it: a duplicate, never a loss).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import threading
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pulsar
from prometheus_client import Counter, Gauge

from gateway.log_rate_limit import rate_limited_logger
from gateway.metrics import GatewayMetrics
from recsys_contracts.env_vars import GatewayEnv
from recsys_contracts.event_wire import MAGIC, SCHEMA_VERSION, encode_batch
from recsys_contracts.metric_names import (
    GATEWAY_EVENTS_BUFFERED,
    GATEWAY_EVENTS_RESTORED,
    GATEWAY_EVENTS_SPILLED,
)

log = rate_limited_logger(__name__)
# The Pulsar client's own log: warnings and errors (each reconnect attempt, backed
# off by the client up to a minute apart), written by the client itself to the
# gateway's output. Not a Python logger: the client hands a Python logger every line
# it writes, debug lines included (several per message sent), each taking the GIL from
# the event loop, which cost more than the sends themselves.
PULSAR_LOG = pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn)

DEFAULT_CAPACITY = 10_000
DEFAULT_MAX_ATTEMPTS = 3
# Pulsar's own timeouts, short enough that an outage turns into counted drops in
# seconds rather than in its default 30 s.
OPERATION_TIMEOUT_S = 5
SEND_TIMEOUT_MS = 5_000
BATCH_DELAY_MS = 5
# How long the sender thread lets impressions gather after it has sent all it had,
# while they come often: what sets the size of a batch (25 at 1 000 requests a
# second), and what an impression waits at most before it is handed to the client.
# An interaction cuts the pause short (the feature job's freshness counts from it).
GATHER_S = 0.025
# Takes closer together than this mean events come often enough to pause and gather.
FREQUENT_GAP_S = 4 * GATHER_S
# At most this many impressions, and about this many bytes, in one message (an
# impression of 10 items is about 300 bytes; Pulsar refuses messages over 5 MB).
MAX_BATCH_EVENTS = 256
MAX_BATCH_BYTES = 1024 * 1024
# Events the sender takes from the buffer at once (then sends before taking more).
MAX_TAKEN = 4 * MAX_BATCH_EVENTS
# How long `close` keeps sending what is buffered.
DRAIN_TIMEOUT_S = 5.0
TOKEN_ENV = GatewayEnv.PULSAR_TOKEN


class DropReason(StrEnum):
    BUFFER_FULL = "buffer_full"
    SEND_FAILED = "send_failed"
    NOT_CONFIGURED = "not_configured"
    INVALID_EVENT = "invalid_event"
    SHUTDOWN = "shutdown"


@dataclass
class OutgoingEvent:
    system: str  # metrics label
    stream: str  # "impressions" | "interactions", metrics label
    service_url: str
    topic: str
    key: str  # partition key: the user id, so one user's events stay in order
    payload: bytes
    attempts: int = 0

    def to_line(self) -> str:
        record = asdict(self)
        record["payload"] = base64.b64encode(self.payload).decode("ascii")
        return json.dumps(record, separators=(",", ":")) + "\n"

    @classmethod
    def from_line(cls, line: str) -> OutgoingEvent:
        record = json.loads(line)
        record["payload"] = base64.b64decode(record["payload"])
        record["attempts"] = 0
        return cls(**record)


_SPILLED_SYSTEM = re.compile(r'^\{"system":("(?:[^"\\]|\\.)*")')


def _system_of(line: str) -> str:
    """The system of a spilled line that does not read whole: its first field
    (`OutgoingEvent.to_line` writes it first), or `unknown`."""
    found = _SPILLED_SYSTEM.match(line)
    if found is None:
        return "unknown"
    try:
        return str(json.loads(found.group(1)))
    except ValueError:
        return "unknown"


_AVRO_V1 = MAGIC + bytes((SCHEMA_VERSION,))
BATCHED_STREAM = "impressions"


@dataclass
class OutgoingMessage:
    """What one send carries: one event, or a batch of one stream's events for one topic."""

    events: list[OutgoingEvent]
    payload: bytes
    key: str | None  # None for a batch: no one user's

    @classmethod
    def messages(cls, events: list[OutgoingEvent]) -> list[OutgoingMessage]:
        """`events` as messages: impressions (Avro) batched per system and topic, in
        the order taken, everything else one to a message."""
        out: list[OutgoingMessage] = []
        open_batches: dict[tuple[str, str, str], list[OutgoingEvent]] = {}
        sizes: dict[tuple[str, str, str], int] = {}  # their payloads' bytes
        for event in events:
            if event.stream != BATCHED_STREAM or not event.payload.startswith(_AVRO_V1):
                out.append(cls([event], event.payload, event.key))
                continue
            key = (event.system, event.service_url, event.topic)
            batch = open_batches.setdefault(key, [])
            if batch and sizes[key] + len(event.payload) > MAX_BATCH_BYTES:
                out.append(cls.batch(open_batches.pop(key)))
                batch = open_batches[key] = []
            batch.append(event)
            sizes[key] = (sizes[key] if len(batch) > 1 else 0) + len(event.payload)
            if len(batch) >= MAX_BATCH_EVENTS:
                out.append(cls.batch(open_batches.pop(key)))
        out.extend(cls.batch(batch) for batch in open_batches.values())
        return out

    @classmethod
    def batch(cls, events: list[OutgoingEvent]) -> OutgoingMessage:
        if len(events) == 1:  # a batch of one would only cost a consumer more
            return cls([events[0]], events[0].payload, events[0].key)
        return cls(list(events), encode_batch([e.payload for e in events]), None)

    @property
    def first(self) -> OutgoingEvent:
        return self.events[0]


# Send results that mean "the broker is not reachable now", not "it refused this event".
_UNREACHABLE = frozenset(
    {pulsar.Result.Timeout, pulsar.Result.ConnectError, pulsar.Result.AlreadyClosed}
)


class EventSink:
    """The buffer, the sender thread and the Pulsar client of one gateway."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        *,
        capacity: int = DEFAULT_CAPACITY,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        token: str | None = None,
        operation_timeout_s: int = OPERATION_TIMEOUT_S,
        spill_path: Path | None = None,
    ) -> None:
        self.metrics = metrics
        self.spill_path = spill_path
        self.max_attempts = max_attempts
        self.operation_timeout_s = operation_timeout_s
        self._token = token if token is not None else os.environ.get(TOKEN_ENV)
        self._buffer: queue.Queue[OutgoingEvent] = queue.Queue(maxsize=capacity)
        self._closing = threading.Event()
        self._wake = threading.Event()  # ends the sender's pause: an interaction, or close
        self._drain_deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name="gateway-event-sink", daemon=True)
        # Touched by the sender thread only.
        self._client: pulsar.Client | None = None
        self._client_url: str | None = None
        self._producers: dict[str, pulsar.Producer] = {}
        # Events handed to the sender or to the Pulsar client and not yet resolved (sent,
        # dropped or re-buffered): what `close` spills if the sender does not finish.
        self._unresolved: dict[int, OutgoingEvent] = {}
        self._lock = threading.Lock()
        self._spill_lock = threading.Lock()
        # Restored events not resolved yet (`_resolved`), kept alive so ids stay theirs.
        self._restoring: dict[int, OutgoingEvent] = {}
        self._restoring_lock = threading.Lock()
        self._abandoned = False  # after close: late outcomes are no longer counted
        r = metrics.registry
        Gauge(
            GATEWAY_EVENTS_BUFFERED,
            "Events the broker has not acknowledged yet: buffered, in the sender's hands, "
            "or sent and unconfirmed.",
            registry=r,
        ).set_function(lambda: self._buffer.qsize() + len(self._unresolved))
        self._spilled = Counter(
            GATEWAY_EVENTS_SPILLED,
            "Events written to the spill file at shutdown, to be sent by the next start.",
            ("system",),
            registry=r,
        )
        self._restored = Counter(
            GATEWAY_EVENTS_RESTORED,
            "Events read back from the spill file at start and buffered again.",
            ("system",),
            registry=r,
        )

    # --- the request side: never blocks ------------------------------------------

    def start(self) -> None:
        self._restore()
        self._thread.start()

    def _restore(self) -> None:
        """Buffer again what previous gateways spilled, and what one that was killed
        before it resolved them had read (the `.restoring` file, which stays until
        each of them is resolved: `_resolved`)."""
        if self.spill_path is None:
            return
        restoring = self._restoring_path()
        if self.spill_path.exists():
            if not restoring.exists():
                os.replace(self.spill_path, restoring)
            else:
                with restoring.open("a") as out:
                    out.write("\n" + self.spill_path.read_text(errors="replace"))
                    out.flush()
                    os.fsync(out.fileno())
                self.spill_path.unlink()
        if not restoring.exists():
            return
        lines = restoring.read_text(errors="replace").splitlines()
        for line in filter(None, lines):
            try:
                event = OutgoingEvent.from_line(line)
            except (ValueError, KeyError, TypeError) as exc:
                # Cut short (a gateway killed while it spilled): the file did not keep it.
                system = _system_of(line)
                self.drop(system, DropReason.SHUTDOWN, f"a spilled line cannot be read: {exc}")
                continue
            if self._enqueue(event):
                self._restored.labels(system=event.system).inc()
                self._restoring[id(event)] = event
        if not self._restoring:
            restoring.unlink()
        log.warning("restored %d events spilled by the previous gateway", len(lines))

    def _restoring_path(self) -> Path:
        assert self.spill_path is not None
        return self.spill_path.with_name(self.spill_path.name + ".restoring")

    def _resolved(self, events: list[OutgoingEvent]) -> None:
        """`events` are sent, dropped or spilled: once every restored event is, the
        `.restoring` file has nothing left to keep."""
        if not self._restoring:  # the steady case
            return
        with self._restoring_lock:
            if not self._restoring:
                return
            for event in events:
                self._restoring.pop(id(event), None)
            if self._restoring:
                return
        self._restoring_path().unlink(missing_ok=True)

    def publish(
        self,
        *,
        system: str,
        stream: str,
        service_url: str | None,
        topic: str | None,
        key: str,
        payload: bytes,
    ) -> bool:
        """Queue one event; False (and counted) if it is dropped right away."""
        if not service_url or not topic:
            self.drop(
                system,
                DropReason.NOT_CONFIGURED,
                "the routing names no Pulsar service URL or topic",
            )
            return False
        queued = self._enqueue(OutgoingEvent(system, stream, service_url, topic, key, payload))
        if stream != BATCHED_STREAM:
            self._wake.set()  # sent now, not after the impressions' pause
        return queued

    def close(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Send what is buffered for up to `timeout_s`, then stop, spilling (or counting
        as dropped) every event not acknowledged by then. Takes at most about
        `timeout_s` + 2 s, whatever the broker does. Blocking: call it from a worker
        thread when on an event loop."""
        self._drain_deadline = time.monotonic() + timeout_s
        self._closing.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s + 2)
        with self._lock:
            self._abandoned = True
            left = list(self._unresolved.values())
            self._unresolved.clear()
        with contextlib.suppress(queue.Empty):
            while True:
                left.append(self._buffer.get_nowait())
        self._keep_or_drop(left)

    def _keep_or_drop(self, events: list[OutgoingEvent]) -> None:
        """Spill `events` to the file (counted), or count them as dropped."""
        if not events:
            return
        with self._spill_lock:
            self._spill_or_drop(events)
        self._resolved(events)

    def _spill_or_drop(self, events: list[OutgoingEvent]) -> None:
        if self.spill_path is not None:
            try:
                self.spill_path.parent.mkdir(parents=True, exist_ok=True)
                with self.spill_path.open("a") as spill:
                    spill.writelines(event.to_line() for event in events)
                    spill.flush()
                    os.fsync(spill.fileno())
            except OSError as exc:
                log.error("cannot spill %d events to %s: %s", len(events), self.spill_path, exc)
            else:
                for event in events:
                    self._spilled.labels(system=event.system).inc()
                log.warning("spilled %d unsent events to %s", len(events), self.spill_path)
                return
        for event in events:
            self.drop(event.system, DropReason.SHUTDOWN, "not acknowledged at shutdown")

    def _enqueue(self, event: OutgoingEvent) -> bool:
        try:
            self._buffer.put_nowait(event)
            return True
        except queue.Full:
            self.drop(
                event.system,
                DropReason.BUFFER_FULL,
                f"buffer of {self._buffer.maxsize} events is full",
            )
            self._resolved([event])
            return False

    def drop(self, system: str, reason: DropReason, detail: str) -> None:
        """Count (and log, rate-limited) one event that will never reach the broker."""
        self.metrics.events_dropped.labels(system=system, reason=reason.value).inc()
        log.warning("event dropped (%s): %s", reason.value, detail)

    # --- the sender thread ------------------------------------------------------

    def _run(self) -> None:
        last_event_at, gap = 0.0, float("inf")  # gap: between the last two takes
        while True:
            # (The gap includes the previous pause: events come often when the next
            # one was there within a few pauses.)
            if gap < FREQUENT_GAP_S and self._buffer.empty():
                # Events come often: let some gather before waiting for the next one.
                # A thread waiting on the buffer is woken by every put, one thread
                # switch (and a fight for the GIL with the event loop) per event; the
                # pause makes it one per batch. (When events are rare it would be one
                # more wake per event, so then it waits on the buffer at once.)
                self._wake.wait(GATHER_S)
            if not self._closing.is_set():
                self._wake.clear()  # (what it was set for is in the buffer: taken next)
            try:
                taken = [self._buffer.get(timeout=0.1)]
                taken_at = time.monotonic()
                gap, last_event_at = taken_at - last_event_at, taken_at
            except queue.Empty:
                if self._closing.is_set():
                    break
                continue
            with contextlib.suppress(queue.Empty):
                while len(taken) < MAX_TAKEN:
                    taken.append(self._buffer.get_nowait())
            with self._lock:
                abandoned = self._abandoned
                if not abandoned:
                    for event in taken:
                        self._unresolved[id(event)] = event
            if abandoned:
                # Close has taken over the buffer and the unresolved events; these left
                # the buffer before it did, so they are neither: spill or count them here.
                self._keep_or_drop(taken)
                return
            for message in OutgoingMessage.messages(taken):
                if self._closing.is_set() and time.monotonic() > self._drain_deadline:
                    break  # close spills (or counts) these with the rest
                self._send(message)
            else:
                continue
            break
        self._disconnect()

    def _send(self, message: OutgoingMessage) -> None:
        event = message.first  # all of a message's events share the topic
        failures = 0
        while True:
            try:
                producer = self._producer(event.service_url, event.topic)
                break
            except Exception as exc:  # the Pulsar client raises its own exception family
                failures += 1
                if self._closing.is_set():
                    # Each further try would wait for Pulsar's timeout again: leave the
                    # event (unresolved) and the buffer to close, which spills them.
                    self._drain_deadline = 0.0
                    return
                log.warning("no producer for %s (%s); retrying", event.topic, exc)
                # Back off; the buffer absorbs new events meanwhile (or drops, counted).
                self._closing.wait(min(2.0, 0.2 * 2**failures))
        try:
            producer.send_async(  # a None key: no partition key (a batch of impressions)
                message.payload,
                lambda result, _message_id: self._on_sent(message.events, result),
                partition_key=message.key,
            )
        except Exception as exc:
            self._on_sent(message.events, exc)

    def _on_sent(self, events: list[OutgoingEvent], result: Any) -> None:
        """Runs on a Pulsar client thread (or the sender's, for synchronous errors).
        The events of one message share its outcome (a batch is stored whole or not)."""
        with self._lock:
            if self._abandoned:
                return  # close already spilled or counted them
            events = [e for e in events if self._unresolved.pop(id(e), None) is not None]
        if not events:
            return
        if result == pulsar.Result.Ok:
            first = events[0]
            self.metrics.child(self.metrics.events_sent, first.system, first.stream).inc(
                len(events)
            )
            self._resolved(events)
            return
        if result not in _UNREACHABLE:
            for event in events:
                event.attempts += 1  # the broker refused this event: only so many tries
        if self._closing.is_set():
            self._keep_or_drop(events)
            return
        again = []
        for event in events:
            if event.attempts < self.max_attempts:
                again.append(event)
            else:
                self.drop(event.system, DropReason.SEND_FAILED, f"{event.topic}: {result}")
                self._resolved([event])
        # Buffered again (batched with whatever is buffered then) under the lock close()
        # takes before it empties the buffer: an event put back after that would be in
        # nobody's hands, neither sent nor counted.
        with self._lock:
            abandoned = self._abandoned
            if not abandoned:
                for event in again:
                    self._enqueue(event)
        if abandoned:
            self._keep_or_drop(again)

    def _producer(self, service_url: str, topic: str) -> pulsar.Producer:
        if service_url != self._client_url:
            # The routing moved events to another cluster: finish with the old one.
            self._disconnect()
            self._client = pulsar.Client(
                service_url,
                authentication=pulsar.AuthenticationToken(self._token) if self._token else None,
                operation_timeout_seconds=self.operation_timeout_s,
                logger=PULSAR_LOG,
            )
            self._client_url = service_url
        producer = self._producers.get(topic)
        if producer is None:
            assert self._client is not None
            producer = self._client.create_producer(
                topic,
                send_timeout_millis=SEND_TIMEOUT_MS,
                block_if_queue_full=False,
                max_pending_messages=DEFAULT_CAPACITY,
                batching_enabled=True,
                batching_max_publish_delay_ms=BATCH_DELAY_MS,
            )
            self._producers[topic] = producer
        return producer

    def _disconnect(self) -> None:
        for producer in self._producers.values():
            try:
                producer.flush()
                producer.close()
            except Exception as exc:
                log.warning("closing a Pulsar producer failed: %s", exc)
        self._producers.clear()
        if self._client is not None:
            try:
                self._client.close()
            except Exception as exc:
                log.warning("closing the Pulsar client failed: %s", exc)
        self._client = None
        self._client_url = None
