"""A lean HTTP/1.1 client for one kind of call: POST a JSON body, read the whole answer.

The gateway makes one model-server call per request, so the client's own overhead is
paid on every request. aiohttp's client costs about 0.18 ms of CPU a call on dev-2c
(request and response objects, header multidicts, tracing hooks, timers, the payload
machinery); this one, about a fifth of that: the request is written as one buffer,
the answer read by its `Content-Length` (or chunked, or to the end), on keep-alive
connections kept per origin.

    pool = ConnectionPool(max_connections=256, keepalive_s=30)
    answer = await pool.post(url, body_bytes, {"X-Header": "value"}, timeout_s=0.25)
    answer.status, answer.body
    await pool.close()

What it does not do, because the model servers it talks to do not need it: redirects,
cookies, compression, proxies, 1xx answers other than `100 Continue`.

Errors: `TimeoutError` when the whole call (waiting for a connection included) takes
longer than `timeout_s`; `ConnectionError` (`OSError`) when the server cannot be
reached or closes the connection mid-answer; `BadAnswer` when what comes back is not
HTTP. A connection reused from the pool that turns out closed by the server (its
keep-alive ran out) before any byte of the answer is retried once on a new one, as
browsers and HTTP libraries do.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# An answer larger than this is not a recommendation list: refused, not buffered.
MAX_BODY_BYTES = 16 * 1024 * 1024
# The status line and headers together (StreamReader's buffer limit).
MAX_HEAD_BYTES = 64 * 1024


class BadAnswer(Exception):
    """What the server sent is not an HTTP/1.x answer this client can read."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


@dataclass(frozen=True)
class _Target:
    """A URL taken apart once: where to connect and the fixed part of each request."""

    host: str
    port: int
    tls: bool
    head: bytes  # "POST <path> HTTP/1.1\r\nHost: ...\r\n"

    @classmethod
    def parse(cls, url: str) -> _Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        path = parts.path or "/"
        if parts.query:
            path += f"?{parts.query}"
        head = f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode("latin-1")
        return cls(parts.hostname, port, tls, head)


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0

    def close(self) -> None:
        self.writer.close()


@dataclass
class _Origin:
    """The keep-alive connections to one host:port, and the bound on how many are open."""

    slots: asyncio.Semaphore
    idle: deque[_Connection] = field(default_factory=deque)


class ConnectionPool:
    def __init__(self, *, max_connections: int, keepalive_s: float) -> None:
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self._targets: dict[str, _Target] = {}
        self._origins: dict[tuple[str, int, bool], _Origin] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], timeout_s: float
    ) -> Answer:
        """POST `body` (sent as `application/json`) with `headers`; the whole answer."""
        if self._closed:
            raise RuntimeError("the connection pool is closed")
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = _Target.parse(url)
        request = b"".join(
            (
                target.head,
                b"".join(
                    f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items()
                ),
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body),
                body,
            )
        )
        origin = self._origin(target)
        async with asyncio.timeout(timeout_s), origin.slots:
            connection = self._idle_connection(origin)
            if connection is not None:
                try:
                    return await self._exchange(origin, connection, request)
                except (_ClosedBeforeAnswer, ConnectionError):
                    pass  # the server closed it while idle: once more, on a new one
            connection = await self._connect(target)
            try:
                return await self._exchange(origin, connection, request)
            except _ClosedBeforeAnswer:
                raise ConnectionResetError("the server closed the connection") from None

    async def close(self) -> None:
        self._closed = True
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.popleft().close()

    # --- connections -------------------------------------------------------------

    def _origin(self, target: _Target) -> _Origin:
        key = (target.host, target.port, target.tls)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin(asyncio.Semaphore(self.max_connections))
        return origin

    def _idle_connection(self, origin: _Origin) -> _Connection | None:
        """The most recently used idle connection that is still worth trying."""
        now = time.monotonic()
        while origin.idle:
            connection = origin.idle.pop()
            if now - connection.idle_since < self.keepalive_s and not connection.reader.at_eof():
                return connection
            connection.close()
        return None

    async def _connect(self, target: _Target) -> _Connection:
        tls: ssl.SSLContext | None = None
        if target.tls:
            tls = self._ssl = self._ssl or ssl.create_default_context()
        reader, writer = await asyncio.open_connection(
            target.host, target.port, ssl=tls, limit=MAX_HEAD_BYTES
        )
        return _Connection(reader, writer)

    async def _exchange(self, origin: _Origin, connection: _Connection, request: bytes) -> Answer:
        """Send `request`, read its answer; the connection goes back to the pool only
        when the answer was read whole and the server keeps it open."""
        reusable = False
        try:
            connection.writer.write(request)
            answer, reusable = await _read_answer(connection.reader)
            return answer
        finally:
            if reusable and not self._closed:
                connection.idle_since = time.monotonic()
                origin.idle.append(connection)
            else:
                connection.close()


class _ClosedBeforeAnswer(Exception):
    """The connection ended before the first byte of an answer."""


async def _read_answer(reader: asyncio.StreamReader) -> tuple[Answer, bool]:
    """The answer and whether the connection can carry another request."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _ClosedBeforeAnswer from None
            raise ConnectionResetError("the server closed the connection mid-answer") from None
        except asyncio.LimitOverrunError:
            raise BadAnswer(f"the answer's headers exceed {MAX_HEAD_BYTES} bytes") from None
        status_line, _, header_block = head.partition(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        status_text = rest[:3]
        if not version.startswith(b"HTTP/1.") or not status_text.isdigit():
            raise BadAnswer(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        status = int(status_text)
        if status != 100:
            break
    length: int | None = None
    chunked = False
    keep_alive = version == b"HTTP/1.1"
    for line in header_block.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            if not value.strip().isdigit():
                raise BadAnswer(f"Content-Length is not a number: {value.strip()[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            token = value.strip().lower()
            keep_alive = token == b"keep-alive" or (keep_alive and token != b"close")
    try:
        if status in (204, 304):
            body = b""
        elif chunked:
            body = await _read_chunked(reader)
        elif length is not None:
            if length > MAX_BODY_BYTES:
                raise BadAnswer(f"the answer's body has {length} bytes (at most {MAX_BODY_BYTES})")
            body = await reader.readexactly(length)
        else:  # delimited by the end of the connection
            body = await reader.read(MAX_BODY_BYTES + 1)
            while len(body) <= MAX_BODY_BYTES and not reader.at_eof():
                body += await reader.read(MAX_BODY_BYTES + 1 - len(body))
            if len(body) > MAX_BODY_BYTES:
                raise BadAnswer(f"the answer's body exceeds {MAX_BODY_BYTES} bytes")
            keep_alive = False
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("the server closed the connection mid-answer") from None
    return Answer(status, body), keep_alive


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    size_total = 0
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size_text = size_line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadAnswer(f"not a chunk size: {size_text[:20]!r}") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers, ignored
            return b"".join(parts)
        size_total += size
        if size_total > MAX_BODY_BYTES:
            raise BadAnswer(f"the answer's body exceeds {MAX_BODY_BYTES} bytes")
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise BadAnswer("a chunk does not end with CRLF")
