"""Dead letters: events the job cannot apply, published with the reason instead of dropped.

Each dead letter is a JSON envelope on the dead-letter topic, keyed like the
original message::

    {"reason": "ts: must be Unix epoch milliseconds ...", "code": "invalid_field",
     "topic": "persistent://.../interactions-partition-1", "message_id": "(12,3,1,-1)",
     "subscription": "recsys-features", "key": "u42", "publish_time": 1767225600000,
     "dead_lettered_at": 1767225600123, "payload_format": "json",
     "payload": "{\\"user_id\\": ...}"}

`payload_format` is what the payload's header claims (`avro` or `json`,
`recsys_contracts.event_wire`). `payload` is the original bytes as text when they
are UTF-8, otherwise base64 with `"payload_encoding": "base64"` (always for Avro).
A payload over `MAX_PAYLOAD_BYTES` is kept cut to that many bytes, with
`"payload_truncated": true` and `"payload_bytes"` (its whole size): whole, its letter
could exceed the broker's message size (5 MB by default) and be refused for good; the
message itself stays in its topic (`topic`, `message_id`) for the topic's retention.
The original message is acked only after its dead letter was accepted by the
broker, so a failing broker delays, never loses.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pulsar

from recsys_contracts.event_wire import wire_format_of
from recsys_contracts.events import InvalidEvent
from recsys_contracts.events import now_ms as wall_clock_ms

log = logging.getLogger("stream_jobs.dead_letters")

SEND_TIMEOUT_S = 30.0
MAX_PAYLOAD_BYTES = 512 * 1024
"""Of a payload, the bytes a dead letter keeps at most: escaped as JSON (six bytes a
character at worst) or in base64, the letter stays well under the broker's limit."""


class ReceivedMessage(Protocol):
    """The parts of a received Pulsar message a dead letter records."""

    def data(self) -> bytes: ...
    def topic_name(self) -> str: ...
    def message_id(self) -> Any: ...
    def partition_key(self) -> str: ...
    def publish_timestamp(self) -> int: ...


def envelope(
    message: ReceivedMessage, problem: InvalidEvent, subscription: str, now_ms: int
) -> dict[str, Any]:
    """The dead letter of `message`, which failed with `problem`."""
    whole = message.data()
    payload = whole[:MAX_PAYLOAD_BYTES]
    document: dict[str, Any] = {
        "reason": problem.reason,
        "code": problem.code,
        "topic": message.topic_name(),
        "message_id": str(message.message_id()),
        "subscription": subscription,
        "key": message.partition_key() or None,
        "publish_time": message.publish_timestamp(),
        "dead_lettered_at": now_ms,
        "payload_format": wire_format_of(whole).value,
    }
    if len(payload) < len(whole):
        document["payload_truncated"] = True
        document["payload_bytes"] = len(whole)
    try:
        document["payload"] = _text(payload, cut=len(payload) < len(whole))
    except UnicodeDecodeError:
        document["payload"] = base64.b64encode(payload).decode("ascii")
        document["payload_encoding"] = "base64"
    return document


def _text(payload: bytes, cut: bool) -> str:
    """`payload` as UTF-8 text; one `cut` short may end within a character (up to three
    bytes of it), which is dropped rather than making the whole payload base64."""
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        if cut and exc.start >= len(payload) - 3:
            return payload[: exc.start].decode("utf-8")
        raise


@dataclass
class DeadLetter:
    message: ReceivedMessage
    problem: InvalidEvent


class DeadLetterPublisher:
    """Publishes dead letters and says which of them the broker accepted."""

    def __init__(self, producer: pulsar.Producer, subscription: str) -> None:
        self.producer = producer
        self.subscription = subscription

    def publish(self, letters: Sequence[DeadLetter], now_ms: int) -> list[bool]:
        """Send all, wait for the broker, and return per letter whether it was stored."""
        results: list[bool] = [False] * len(letters)
        done = threading.Semaphore(0)

        def callback(index: int) -> Any:
            def on_sent(result: pulsar.Result, _message_id: Any) -> None:
                results[index] = result == pulsar.Result.Ok
                done.release()

            return on_sent

        for i, letter in enumerate(letters):
            body = json.dumps(envelope(letter.message, letter.problem, self.subscription, now_ms))
            key = letter.message.partition_key()
            try:
                if key:
                    self.producer.send_async(body.encode(), callback(i), partition_key=key)
                else:
                    self.producer.send_async(body.encode(), callback(i))
            except pulsar.PulsarException:
                done.release()  # stays False: the original is not acked and comes back
        with contextlib.suppress(pulsar.PulsarException):
            self.producer.flush()  # the callbacks report which letters failed
        deadline = time.monotonic() + SEND_TIMEOUT_S
        for _ in letters:
            if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
        return results

    def publish_once(
        self, letters: Sequence[DeadLetter], stored: Callable[[DeadLetter], None]
    ) -> list[DeadLetter]:
        """Publish `letters`, calling `stored` for each the broker has; the refused ones."""
        refused = []
        for letter, ok in zip(letters, self.publish(letters, wall_clock_ms()), strict=True):
            if ok:
                stored(letter)
            else:
                refused.append(letter)
        return refused

    def publish_until_stored(
        self,
        letters: Sequence[DeadLetter],
        stored: Callable[[DeadLetter], None],
        give_up: Callable[[], bool],
        wait: Callable[[float], None],
        backoff: tuple[float, float],
    ) -> list[DeadLetter]:
        """Publish `letters`, calling `stored` for each once the broker has it (the
        caller acks its message then); the refused ones are sent again after
        `wait(delay)`, the delay doubling from `backoff[0]` to `backoff[1]`, their
        messages unacked meanwhile (a message left unacked with a live consumer would
        come back only when that consumer goes), until `give_up()`. Returns the letters
        still refused then (none unless it gave up)."""
        delay, longest = backoff
        while True:
            refused = self.publish_once(letters, stored)
            if not refused or give_up():
                return refused
            log.warning(
                "the dead-letter topic refused %d messages; retrying in %.2fs", len(refused), delay
            )
            wait(delay)
            delay = min(2 * delay, longest)
            letters = refused
