"""The dead-letter envelope: the original payload, the reason, and where it came from."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass

from recsys_contracts.events import InvalidEvent
from stream_jobs.dead_letters import (
    MAX_PAYLOAD_BYTES,
    DeadLetter,
    DeadLetterPublisher,
    envelope,
)


@dataclass
class FakeMessage:
    payload: bytes
    key: str = "u1"

    def data(self) -> bytes:
        return self.payload

    def topic_name(self) -> str:
        return "persistent://public/default/interactions-partition-1"

    def message_id(self) -> str:
        return "(12,3,1,-1)"

    def partition_key(self) -> str:
        return self.key

    def publish_timestamp(self) -> int:
        return 1_767_225_600_000


def test_the_envelope_carries_reason_origin_and_the_original_text() -> None:
    letter = envelope(
        FakeMessage(b'{"user_id": "u1"}'),
        InvalidEvent("invalid_field", "ts: Field required"),
        "features",
        5,
    )
    assert letter == {
        "reason": "ts: Field required",
        "code": "invalid_field",
        "topic": "persistent://public/default/interactions-partition-1",
        "message_id": "(12,3,1,-1)",
        "subscription": "features",
        "key": "u1",
        "publish_time": 1_767_225_600_000,
        "dead_lettered_at": 5,
        "payload_format": "json",
        "payload": '{"user_id": "u1"}',
    }
    json.dumps(letter)  # it is JSON as it stands


def test_binary_payloads_are_kept_exactly_as_base64() -> None:
    raw = b"\xff\x00\xfe"
    letter = envelope(
        FakeMessage(raw, key=""), InvalidEvent("not_json", "Invalid JSON"), "features", 5
    )
    assert letter["payload_encoding"] == "base64"
    assert base64.b64decode(letter["payload"]) == raw
    assert letter["key"] is None


def test_a_payload_over_the_bound_is_kept_cut_short_and_says_so() -> None:
    """Even as JSON escapes (six bytes a control character), the letter stays under
    the broker's 5 MB message limit."""
    raw = b"\x01" * (MAX_PAYLOAD_BYTES + 10)
    letter = envelope(FakeMessage(raw), InvalidEvent("not_json", "Invalid JSON"), "features", 5)
    assert letter["payload"] == "\x01" * MAX_PAYLOAD_BYTES
    assert letter["payload_truncated"] is True and letter["payload_bytes"] == len(raw)
    assert len(json.dumps(letter)) < 5_000_000
    whole = envelope(FakeMessage(raw[:MAX_PAYLOAD_BYTES]), InvalidEvent("x", "y"), "f", 5)
    assert "payload_truncated" not in whole and "payload_bytes" not in whole


def test_a_text_payload_cut_within_a_character_stays_text() -> None:
    """The cut at MAX_PAYLOAD_BYTES can fall inside a multi-byte UTF-8 character: that
    character is dropped, the payload stays readable text (not base64)."""
    raw = b"a" * (MAX_PAYLOAD_BYTES - 1) + "é…".encode() * 3  # é straddles the cut
    letter = envelope(FakeMessage(raw), InvalidEvent("not_json", "Invalid JSON"), "features", 5)
    assert letter["payload"] == "a" * (MAX_PAYLOAD_BYTES - 1)
    assert "payload_encoding" not in letter and letter["payload_truncated"] is True
    broken = b"\xff" + b"a" * MAX_PAYLOAD_BYTES  # not UTF-8 anywhere near the cut: base64
    assert (
        envelope(FakeMessage(broken), InvalidEvent("x", "y"), "f", 5)["payload_encoding"]
        == "base64"
    )


class RefusingFirst(DeadLetterPublisher):
    """A publisher whose broker refuses each letter its first `refusals[i]` times (the
    loop's own logic against a stand-in for the broker's answers)."""

    def __init__(self, refusals: list[int]) -> None:
        self.refusals = refusals
        self.sent: list[int] = []

    def publish(self, letters: Sequence[DeadLetter], now_ms: int) -> list[bool]:
        out = []
        for letter in letters:
            index = int(letter.message.data())
            self.sent.append(index)
            out.append(self.refusals[index] == 0)
            self.refusals[index] = max(0, self.refusals[index] - 1)
        return out


def letters(count: int) -> list[DeadLetter]:
    return [DeadLetter(FakeMessage(str(n).encode()), InvalidEvent("x", "y")) for n in range(count)]


def test_refused_letters_are_sent_again_with_doubling_backoff_until_stored() -> None:
    publisher = RefusingFirst([0, 2, 3])
    stored: list[bytes] = []
    waits: list[float] = []
    left = publisher.publish_until_stored(
        letters(3), lambda one: stored.append(one.message.data()), lambda: False, waits.append,
        backoff=(0.05, 0.15),
    )  # fmt: skip
    assert left == [] and stored == [b"0", b"1", b"2"]  # each once, in the order stored
    assert publisher.sent == [0, 1, 2, 1, 2, 1, 2, 2]  # only the refused ones again
    assert waits == [0.05, 0.1, 0.15]  # doubling, capped


def test_giving_up_returns_the_letters_still_refused() -> None:
    publisher = RefusingFirst([0, 9])
    stored: list[DeadLetter] = []
    tries = iter([False, True])
    left = publisher.publish_until_stored(
        letters(2), stored.append, lambda: next(tries), lambda _: None,
        backoff=(0.01, 1.0),
    )  # fmt: skip
    assert [one.message.data() for one in left] == [b"1"] and len(stored) == 1
    assert publisher.sent == [0, 1, 1]
