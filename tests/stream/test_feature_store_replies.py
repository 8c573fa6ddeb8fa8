"""The feature store's RESP reader (`feature_store._Replies`, hiredis underneath):
replies split anywhere by the network, RESP3 push messages between them, every RESP3
type Redis sends (not the attribute type, which no Redis command sends)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import redis

from stream_jobs.feature_store import _Replies

# A transaction's replies as a RESP3 server sends them, a push message before them and
# one after; then the next read's reply.
PUSH = b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"
FIRST = (
    PUSH
    + b"+OK\r\n$3\r\nabc\r\n*2\r\n:1\r\n$-1\r\n%2\r\n+a\r\n:1\r\n+b\r\n,2.5\r\n"
    + b"~1\r\n$1\r\nx\r\n:7\r\n_\r\n#t\r\n#f\r\n-ERR bad\r\n"
    + b"=8\r\ntxt:some\r\n(12345678901234567890\r\n$0\r\n\r\n*-1\r\n"
    + PUSH
)
SECOND = b":42\r\n" + PUSH[:9]  # and a push message cut short, completed later
THIRD = PUSH[9:] + b"$2\r\nok\r\n"
WANTED = [
    b"OK",
    b"abc",
    [1, None],
    {b"a": 1, b"b": 2.5},
    [b"x"],
    7,
    None,
    True,
    False,  # a reply, not "no whole reply yet"
    "error",
    b"some",
    b"12345678901234567890",  # a big number's digits, as redis-py (with hiredis) reads it
    b"",
    None,
]


class Chunks:
    """A socket that hands out the bytes it was given, in the pieces given."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def recv(self, size: int) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def replies_of(pieces: list[bytes]) -> list[list[object]]:
    reader = _Replies(SimpleNamespace(_sock=Chunks(pieces)))
    return [reader.read(len(WANTED)), reader.read(1), reader.read(1)]


def plain(replies: list[object]) -> list[object]:
    return ["error" if isinstance(r, redis.ResponseError) else r for r in replies]


def test_replies_split_at_every_byte_boundary_read_the_same() -> None:
    data = FIRST + SECOND + THIRD
    for cut in range(1, len(data)):
        first, second, third = replies_of([data[:cut], data[cut:]])
        assert plain(first) == WANTED, cut
        assert second == [42] and third == [b"ok"], cut
    first, second, third = replies_of([data[n : n + 1] for n in range(len(data))])
    assert plain(first) == WANTED and second == [42] and third == [b"ok"]


def test_bytes_past_the_wanted_replies_wait_for_the_next_read() -> None:
    """One receive holding this read's replies and the start of the next read's."""
    first, second, third = replies_of([FIRST + SECOND, THIRD])
    assert plain(first) == WANTED and second == [42] and third == [b"ok"]


@pytest.mark.parametrize(
    "garbage",
    [
        b"?what\r\n",
        b":12a\r\n",
        b"$3\r\nabcdef\r\n:1\r\n",  # too long a bulk string: found at the reply after it
        b"*x\r\n",
        b"%1\r\n*1\r\n:1\r\n:2\r\n",
        b"=3\r\nabc\r\n",
    ],
)
def test_a_reply_that_is_no_resp_is_a_connection_error(garbage: bytes) -> None:
    reader = _Replies(SimpleNamespace(_sock=Chunks([garbage])))
    with pytest.raises(redis.ConnectionError):
        reader.read(2)


def test_a_closed_connection_is_a_connection_error() -> None:
    with pytest.raises(redis.ConnectionError):
        _Replies(SimpleNamespace(_sock=Chunks([b":1"]))).read(1)
    with pytest.raises(redis.ConnectionError):
        _Replies(SimpleNamespace(_sock=None)).read(1)
