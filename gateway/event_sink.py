"""Events to Pulsar without ever slowing a response down.

Request handlers call `EventSink.publish`, which only puts the encoded event into a
bounded in-memory buffer and returns. One background thread takes events from the
buffer and hands them to the Pulsar client's asynchronous, batching producer; the
client's own threads report each send's outcome. The event loop never waits for
Pulsar, so a slow or absent broker costs events, never latency or availability.

Losing events is allowed; losing them silently is not. Every event that does not
reach the broker is counted in `recsys_gateway_events_dropped_total{reason}`:

- `buffer_full`        the buffer is full (the broker is down or slower than traffic);
- `broker_unavailable` no producer could be created after `max_attempts` tries;
- `send_failed`        the broker did not acknowledge after `max_attempts` sends;
- `not_configured`     the routing names no Pulsar service URL or topic;
- `invalid_event`      the event contract refuses it (e.g. a model returned an item id
                       with spaces);
- `shutdown`           still buffered when the gateway stopped (after a bounded drain).

A failed send is retried by putting the event back into the buffer, so retries never
block the sender thread. Pulsar is at-least-once anyway: consumers dedupe by
`event_id`, which a retry keeps.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pulsar

from gateway.log_rate_limit import rate_limited_logger
from gateway.metrics import GatewayMetrics
from recsys_contracts.env_vars import GatewayEnv

log = rate_limited_logger(__name__)
# The Pulsar client reports each reconnect attempt; keep them, but rate-limited.
pulsar_log = rate_limited_logger("gateway.pulsar")
pulsar_log.setLevel(logging.WARNING)

DEFAULT_CAPACITY = 10_000
DEFAULT_MAX_ATTEMPTS = 3
# Pulsar's own timeouts, short enough that an outage turns into counted drops in
# seconds rather than in its default 30 s.
OPERATION_TIMEOUT_S = 5
SEND_TIMEOUT_MS = 5_000
BATCH_DELAY_MS = 5
# How long `close` keeps sending what is buffered.
DRAIN_TIMEOUT_S = 5.0
TOKEN_ENV = GatewayEnv.PULSAR_TOKEN


class DropReason(StrEnum):
    BUFFER_FULL = "buffer_full"
    BROKER_UNAVAILABLE = "broker_unavailable"
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
    ) -> None:
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.operation_timeout_s = operation_timeout_s
        self._token = token if token is not None else os.environ.get(TOKEN_ENV)
        self._buffer: queue.Queue[OutgoingEvent] = queue.Queue(maxsize=capacity)
        self._closing = threading.Event()
        self._drain_deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name="gateway-event-sink", daemon=True)
        # Touched by the sender thread only.
        self._client: pulsar.Client | None = None
        self._client_url: str | None = None
        self._producers: dict[str, pulsar.Producer] = {}

    # --- the request side: never blocks ------------------------------------------

    def start(self) -> None:
        self._thread.start()

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
        return self._enqueue(OutgoingEvent(system, stream, service_url, topic, key, payload))

    def close(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Send what is buffered for up to `timeout_s`, then stop. Blocking: call it
        from a worker thread when on an event loop."""
        self._drain_deadline = time.monotonic() + timeout_s
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s + self.operation_timeout_s + 5)

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
            return False

    def drop(self, system: str, reason: DropReason, detail: str) -> None:
        """Count (and log, rate-limited) one event that will never reach the broker."""
        self.metrics.events_dropped.labels(system=system, reason=reason.value).inc()
        log.warning("event dropped (%s): %s", reason.value, detail)

    # --- the sender thread ------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                event = self._buffer.get(timeout=0.1)
            except queue.Empty:
                if self._closing.is_set():
                    break
                continue
            if self._closing.is_set() and time.monotonic() > self._drain_deadline:
                self.drop(event.system, DropReason.SHUTDOWN, "still buffered at shutdown")
                continue
            self._send(event)
        self._disconnect()

    def _send(self, event: OutgoingEvent) -> None:
        while True:
            try:
                producer = self._producer(event.service_url, event.topic)
                break
            except Exception as exc:  # the Pulsar client raises its own exception family
                event.attempts += 1
                if self._closing.is_set():
                    # Each further try would wait for Pulsar's timeout again: give up
                    # on everything still buffered.
                    self._drain_deadline = 0.0
                    self.drop(event.system, DropReason.SHUTDOWN, f"{event.topic}: {exc}")
                    return
                if event.attempts >= self.max_attempts:
                    self.drop(event.system, DropReason.BROKER_UNAVAILABLE, f"{event.topic}: {exc}")
                    return
                # Back off; the buffer absorbs new events meanwhile (or drops, counted).
                self._closing.wait(min(2.0, 0.2 * 2**event.attempts))
        try:
            producer.send_async(
                event.payload,
                lambda result, _message_id: self._on_sent(event, result),
                partition_key=event.key,
            )
        except Exception as exc:
            self._on_sent(event, exc)

    def _on_sent(self, event: OutgoingEvent, result: Any) -> None:
        """Runs on a Pulsar client thread (or the sender's, for synchronous errors)."""
        if result == pulsar.Result.Ok:
            self.metrics.events_sent.labels(system=event.system, stream=event.stream).inc()
            return
        event.attempts += 1
        if event.attempts < self.max_attempts and not self._closing.is_set():
            self._enqueue(event)
        else:
            self.drop(event.system, DropReason.SEND_FAILED, f"{event.topic}: {result}")

    def _producer(self, service_url: str, topic: str) -> pulsar.Producer:
        if service_url != self._client_url:
            # The routing moved events to another cluster: finish with the old one.
            self._disconnect()
            self._client = pulsar.Client(
                service_url,
                authentication=pulsar.AuthenticationToken(self._token) if self._token else None,
                operation_timeout_seconds=self.operation_timeout_s,
                logger=pulsar_log,
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
