"""Sending events to the interactions topic, for users' services and scripts.

    with EventProducer("pulsar://broker:6650", "persistent://recsys/ns/interactions") as p:
        p.send(new_event("u42", "i7", "click"))

Events are Avro (`recsys_contracts.event_wire`), keyed by `user_id`, so one user's
events land on one partition and stay in order; `wire_format=WireFormat.JSON` (or
`RECSYS_EVENT_WIRE_FORMAT=json`) keeps JSON for consumers that read only JSON. Sends are asynchronous; `flush()` (and leaving the `with`
block) waits until the broker has stored them and raises if any were refused.

With a KeyShared subscription on a real Pulsar cluster, pass
`key_based_batching=True` so that a batch never mixes users (else the broker
routes the whole batch by its first key). pulsar-lite loses key-based batches,
so it is off by default.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

import pulsar

from recsys_contracts.event_wire import WireFormat, encode_event, wire_format_from_env
from recsys_contracts.events import (
    Event,
    InvalidEvent,
    event_from_record,
    fill_missing,
    now_ms,
    parse_event,
    parse_json_object,
)


class SendFailed(RuntimeError):
    """The broker refused some events; the message says how many and why."""


class EventProducer:
    """A Pulsar producer of events, keyed by user id."""

    def __init__(
        self,
        service_url: str,
        topic: str,
        *,
        token: str | None = None,
        key_based_batching: bool = False,
        client: pulsar.Client | None = None,
        timeout_s: int = 30,
        wire_format: WireFormat | None = None,
    ) -> None:
        """`timeout_s` bounds connecting, looking the topic up and each send: past it
        they fail (a send that timed out may still have been stored: resend it with the
        same `event_id`, the job counts it once). `wire_format` defaults to
        `RECSYS_EVENT_WIRE_FORMAT`, else Avro."""
        self.wire_format = wire_format_from_env() if wire_format is None else wire_format
        self._own_client = client is None
        self._client = client or pulsar.Client(
            service_url,
            authentication=pulsar.AuthenticationToken(token) if token else None,
            operation_timeout_seconds=timeout_s,
            connection_timeout_ms=timeout_s * 1000,
            logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error),
        )
        self._producer = self._client.create_producer(
            topic,
            send_timeout_millis=timeout_s * 1000,
            batching_enabled=True,
            batching_max_publish_delay_ms=5,
            batching_type=pulsar.BatchingType.KeyBased
            if key_based_batching
            else pulsar.BatchingType.Default,
            block_if_queue_full=True,  # back-pressure instead of errors on bursts
        )
        self._lock = threading.Lock()
        self._failures: list[str] = []
        self.sent = 0
        self.acknowledged = 0

    def send(self, event: Event) -> None:
        """Queue `event` for sending (returns before the broker confirms it)."""
        self.send_raw(encode_event(event, self.wire_format), event.user_id)

    def send_raw(self, payload: bytes, user_id: str) -> None:
        """Queue an already-encoded event; `payload` is sent as is."""
        self._producer.send_async(payload, self._on_sent, partition_key=user_id)
        self.sent += 1

    def _on_sent(self, result: pulsar.Result, _message_id: Any) -> None:
        with self._lock:
            if result == pulsar.Result.Ok:
                self.acknowledged += 1
            else:
                self._failures.append(str(result))

    def flush(self) -> None:
        """Wait until everything queued is stored; SendFailed if the broker refused any."""
        self._producer.flush()
        with self._lock:
            failures, self._failures = self._failures, []
        if failures:
            raise SendFailed(f"{len(failures)} events were not stored: {sorted(set(failures))}")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._producer.close()
            if self._own_client:
                self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class LineProblem:
    line_number: int
    reason: str


@dataclass
class SendReport:
    sent: int = 0
    problems: list[LineProblem] = field(default_factory=list)
    without_id_or_time: int = 0
    """Invalid lines that are JSON objects without `event_id` or `ts` (`fill` gives them)."""


def send_lines(
    producer: EventProducer,
    lines: Iterable[str],
    *,
    fill: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> SendReport:
    """Send one JSON event per line; invalid lines are reported, not sent.

    Blank lines and lines starting with `#` are skipped. `fill` gives events
    without `event_id` or `ts` a random id and the current time. `on_progress`
    is called with (sent, invalid) every 1,000 lines and at the end.
    """
    report = SendReport()
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            if fill:
                event = event_from_record(fill_missing(parse_json_object(text), now_ms()))
            else:
                event = parse_event(text)
        except InvalidEvent as problem:
            report.problems.append(LineProblem(number, problem.reason))
            if not fill and _lacks_id_or_time(text):
                report.without_id_or_time += 1
            continue
        producer.send(event)
        report.sent += 1
        if on_progress is not None and number % 1000 == 0:
            on_progress(report.sent, len(report.problems))
    producer.flush()
    if on_progress is not None:
        on_progress(report.sent, len(report.problems))
    return report


def _lacks_id_or_time(text: str) -> bool:
    try:
        record = parse_json_object(text)
    except InvalidEvent:
        return False
    return "event_id" not in record or "ts" not in record
