"""The gateway's HTTP/1.1 client to the model server (`gateway.http_pool`), against real
servers on 127.0.0.1 that answer the way servers do: by length, chunked, to the end of
the connection, closing idle keep-alive connections, too slowly, or not in HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.http_pool import BadAnswer, ConnectionPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A TCP server on loopback running `handler` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/predictions/recs/1"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return body


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    pool = ConnectionPool(max_connections=4, keepalive_s=30)
    yield pool
    await pool.close()


def by_length(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n" % (status, len(body), extra) + body


async def test_keep_alive_answers_reuse_one_connection_and_send_the_headers(
    pool: ConnectionPool,
) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            body = await server.read_request(reader)
            writer.write(by_length(b'{"echo": ' + body + b"}"))

    async with Server(echo) as server:
        for n in range(3):
            answer = await pool.post(server.url, b'{"n": %d}' % n, {"X-Deadline": "7"}, 1.0)
            assert (answer.status, answer.body) == (200, b'{"echo": {"n": %d}}' % n)
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /predictions/recs/1 HTTP/1.1\r\n")
    assert b"\r\nX-Deadline: 7\r\n" in first
    assert b"\r\nContent-Type: application/json\r\n" in first


async def test_chunked_and_connection_delimited_answers_are_read_whole(
    pool: ConnectionPool,
) -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'4\r\n{"a"\r\n3;ext=1\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n'
        )

    async with Server(chunked) as server:
        assert (await pool.post(server.url, b"{}", {}, 1.0)).body == b'{"a": 1}'

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.0 503 Busy\r\n\r\n" + b"x" * 100_000)

    async with Server(until_close) as server:
        answer = await pool.post(server.url, b"{}", {}, 1.0)
        assert (answer.status, len(answer.body)) == (503, 100_000)
        await pool.post(server.url, b"{}", {}, 1.0)
        assert server.connections == 2  # an answer delimited by the close is not reused


async def test_a_keep_alive_connection_the_server_closed_is_retried_on_a_new_one(
    pool: ConnectionPool,
) -> None:
    async def one_answer_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)
        writer.write(by_length(b"ok"))
        await writer.drain()
        # Closes without "Connection: close", as a keep-alive timeout does: the client
        # finds out when it sends the next request on it.

    async with Server(one_answer_then_close) as server:
        assert (await pool.post(server.url, b"{}", {}, 1.0)).body == b"ok"
        await asyncio.sleep(0.05)
        assert (await pool.post(server.url, b"{}", {}, 1.0)).body == b"ok"
    assert server.connections == 2


async def test_connection_close_is_honoured(pool: ConnectionPool) -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(by_length(b"ok", extra=b"Connection: close\r\n"))

    async with Server(closing) as server:
        for _ in range(2):
            await pool.post(server.url, b"{}", {}, 1.0)
    assert server.connections == 2


async def test_failures_are_timeouts_connection_errors_or_bad_answers(
    pool: ConnectionPool,
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(5)

    async with Server(silent) as server:
        with pytest.raises(TimeoutError):
            await pool.post(server.url, b"{}", {}, 0.1)
        refused_url = server.url
    with pytest.raises(ConnectionError):
        await pool.post(refused_url, b"{}", {}, 1.0)  # nobody listens there any more

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    async with Server(not_http) as server:
        with pytest.raises(BadAnswer, match=r"not an HTTP/1\.x status line"):
            await pool.post(server.url, b"{}", {}, 1.0)

    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"item')

    async with Server(cut_short) as server:
        with pytest.raises(ConnectionError, match="mid-answer"):
            await pool.post(server.url, b"{}", {}, 1.0)


async def test_at_most_max_connections_are_open_at_once(pool: ConnectionPool) -> None:
    in_progress = 0
    most = 0

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_progress, most
        while True:
            await server.read_request(reader)
            in_progress += 1
            most = max(most, in_progress)
            await asyncio.sleep(0.02)
            in_progress -= 1
            writer.write(by_length(b"ok"))

    async with Server(slow) as server:
        answers = await asyncio.gather(*(pool.post(server.url, b"{}", {}, 5.0) for _ in range(12)))
    assert [a.body for a in answers] == [b"ok"] * 12
    assert most == 4 and server.connections == 4  # the pool's max_connections
